;; A WASI preview1 command that writes to stderr for ever: one 1,000-byte
;; line per fd_write, never reading stdin (only limits.timeout ends it).
;; corral's tests use it to check that a guest's stderr is bounded per
;; instance and rate-limited per app before it reaches corrald's log.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; iovec at 0: the line at 64, 1,000 bytes; bytes written land at 16.
  (data (i32.const 0) "\40\00\00\00\e8\03\00\00")
  (func (export "_start")
    (local $i i32)
    ;; the line: 999 'x' and a newline
    (local.set $i (i32.const 0))
    (loop $fill
      (i32.store8 (i32.add (i32.const 64) (local.get $i)) (i32.const 120))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $fill (i32.lt_u (local.get $i) (i32.const 999))))
    (i32.store8 (i32.const 1063) (i32.const 10))
    (loop $forever
      (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 16)))
      (br $forever))))
