;; A WASI preview1 command that grows its memory by 1 MiB at a time without
;; bound. Under limits.memory it must trap; if memory.grow ever returns -1
;; instead, it exits with 1 so a test can tell.
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func $grow_forever (export "grow_forever")
    (loop $more
      (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    (call $proc_exit (i32.const 1)))
  (func (export "_start") (call $grow_forever)))
