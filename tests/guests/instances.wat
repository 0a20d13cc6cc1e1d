;; A wasi:cli/command component that instantiates one core module four
;; times. With limits.instances below 4 instantiation must fail naming the
;; limit; otherwise `run` returns ok (exit 0).
(component
  (core module $m
    (func (export "run") (result i32) (i32.const 0)))
  (core instance $i1 (instantiate $m))
  (core instance $i2 (instantiate $m))
  (core instance $i3 (instantiate $m))
  (core instance $i4 (instantiate $m))
  (func $run (result (result)) (canon lift (core func $i4 "run")))
  (instance $run (export "run" (func $run)))
  (export "wasi:cli/run@0.2.0" (instance $run)))
