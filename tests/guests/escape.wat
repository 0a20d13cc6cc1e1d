;; A WASI preview1 command that tries to leave its preopened directory
;; (fd 3). It opens, relative to the preopen:
;;   inside.txt         a file inside (must open: proves the probe works)
;;   ../../etc/passwd   climbing out
;;   /etc/passwd        an absolute path
;;   link-out           a symlink (made by the test) to /etc/passwd
;; and prints "PATH: opened" or "PATH: denied" for each. Exit code: 0 when
;; every escape was denied, 1 when one succeeded, 2 when inside.txt failed.
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  ;; iovec at 0, nwritten at 16, opened fd at 20
  (data (i32.const 100) "inside.txt")
  (data (i32.const 120) "../../etc/passwd")
  (data (i32.const 140) "/etc/passwd")
  (data (i32.const 160) "link-out")
  (data (i32.const 200) ": opened\n")
  (data (i32.const 220) ": denied\n")
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $ptr))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16))))
  ;; Open PATH for reading (following symlinks); 1 if it opened.
  (func $try (param $ptr i32) (param $len i32) (result i32)
    (call $print (local.get $ptr) (local.get $len))
    (if (result i32)
      (i32.eqz
        (call $path_open
          (i32.const 3)                      ;; the first preopen
          (i32.const 1)                      ;; lookupflags: symlink_follow
          (local.get $ptr) (local.get $len)
          (i32.const 0)                      ;; oflags
          (i64.const 2) (i64.const 0)        ;; rights: fd_read
          (i32.const 0)                      ;; fdflags
          (i32.const 20)))
      (then (call $print (i32.const 200) (i32.const 9)) (i32.const 1))
      (else (call $print (i32.const 220) (i32.const 9)) (i32.const 0))))
  (func (export "_start")
    (local $escaped i32)
    (if (i32.eqz (call $try (i32.const 100) (i32.const 10)))
      (then (call $proc_exit (i32.const 2))))
    (local.set $escaped (call $try (i32.const 120) (i32.const 16)))
    (local.set $escaped (i32.or (local.get $escaped) (call $try (i32.const 140) (i32.const 11))))
    (local.set $escaped (i32.or (local.get $escaped) (call $try (i32.const 160) (i32.const 8))))
    (call $proc_exit (local.get $escaped))))
