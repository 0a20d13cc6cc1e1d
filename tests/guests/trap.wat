;; A WASI preview1 command that traps (`unreachable`) two calls deep, so the
;; backtrace shows the names `inner` and `outer`.
(module
  (memory (export "memory") 1)
  (func $inner (unreachable))
  (func $outer (call $inner))
  (func (export "_start") (call $outer)))
