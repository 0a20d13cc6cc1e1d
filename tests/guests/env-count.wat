;; A WASI preview1 command that exits with 10 * (number of environment
;; variables) + (number of arguments, argv[0] included): a test sets host
;; variables and checks that only the granted ones arrive.
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $environ_sizes_get (i32.const 0) (i32.const 4)))
    (drop (call $args_sizes_get (i32.const 8) (i32.const 12)))
    (call $proc_exit
      (i32.add
        (i32.mul (i32.load (i32.const 0)) (i32.const 10))
        (i32.load (i32.const 8))))))
