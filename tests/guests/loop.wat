;; A WASI preview1 command that never ends: a tight loop with no calls
;; (only the epoch deadline, limits.timeout, can stop it).
(module
  (memory (export "memory") 1)
  (func $spin (export "spin")
    (loop $forever (br $forever)))
  (func (export "_start") (call $spin)))
