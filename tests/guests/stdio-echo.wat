;; A WASI preview1 command that copies stdin to stdout until end of input:
;; (the same program as examples/echo.wat, the example `stdio` app).
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; iovec at 0: { buf = 64, len = 4096 }; nread/nwritten at 16
  (func (export "_start")
    (local $n i32)
    (loop $copy
      (i32.store (i32.const 0) (i32.const 64))
      (i32.store (i32.const 4) (i32.const 4096))
      (br_if 1 (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $n (i32.load (i32.const 16)))
      (br_if 1 (i32.eqz (local.get $n)))
      ;; write exactly what was read (loop on short writes)
      (i32.store (i32.const 4) (local.get $n))
      (block $done
        (loop $write
          (br_if $done (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
          (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.load (i32.const 16))))
          (i32.store (i32.const 4) (i32.sub (i32.load (i32.const 4)) (i32.load (i32.const 16))))
          (br_if $write (i32.gt_u (i32.load (i32.const 4)) (i32.const 0)))))
      (br $copy)))
)
