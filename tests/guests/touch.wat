;; A WASI preview1 command that takes memory and holds it: it grows its
;; linear memory by 48 MiB and writes one byte in every 4 KiB page (so the
;; kernel really gives it the pages: charged to its cgroup), then copies
;; stdin to stdout until end of input, like stdio-echo. As a `stdio` app,
;; each open connection holds one instance's 48 MiB: a few connections
;; take an app past its limits.app-memory (tests/e2e-vm/cgroup-checks.sh).
(module
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $touch
    (local $addr i32) (local $end i32)
    (drop (memory.grow (i32.const 768)))
    (local.set $addr (i32.const 65536))
    (local.set $end (i32.mul (memory.size) (i32.const 65536)))
    (block $done
      (loop $page
        (br_if $done (i32.ge_u (local.get $addr) (local.get $end)))
        (i32.store8 (local.get $addr) (i32.const 1))
        (local.set $addr (i32.add (local.get $addr) (i32.const 4096)))
        (br $page))))
  ;; iovec at 0: { buf = 64, len = 4096 }; nread/nwritten at 16
  (func (export "_start")
    (local $n i32)
    (call $touch)
    (loop $copy
      (i32.store (i32.const 0) (i32.const 64))
      (i32.store (i32.const 4) (i32.const 4096))
      (br_if 1 (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 16)))
      (local.set $n (i32.load (i32.const 16)))
      (br_if 1 (i32.eqz (local.get $n)))
      (i32.store (i32.const 4) (local.get $n))
      (block $done
        (loop $write
          (br_if $done (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
          (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.load (i32.const 16))))
          (i32.store (i32.const 4) (i32.sub (i32.load (i32.const 4)) (i32.load (i32.const 16))))
          (br_if $write (i32.gt_u (i32.load (i32.const 4)) (i32.const 0)))))
      (br $copy)))
)
