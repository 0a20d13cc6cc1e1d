;; A wasi:cli/command component whose imports name three WASI 0.2 patch
;; versions of one interface (as components built by different toolchains
;; do). The host must link all of them; `run` then returns ok (exit 0).
(component
  (import "wasi:cli/environment@0.2.0" (instance
    (export "get-arguments" (func (result (list string))))))
  (import "wasi:cli/environment@0.2.3" (instance
    (export "get-arguments" (func (result (list string))))))
  (import "wasi:cli/environment@0.2.6" (instance
    (export "initial-cwd" (func (result (option string))))))
  (core module $m
    (func (export "run") (result i32) (i32.const 0)))
  (core instance $i (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i "run")))
  (instance $run (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run)))
