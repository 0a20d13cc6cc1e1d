;; A component that exports wasi:http/incoming-handler@0.2.3 with nothing
;; in it: it passes the checks made before start (a component, the right
;; export name) and compiles, but a zygote cannot make a handler of it and
;; fails every time it starts. For the tests of zygote crash loops.
(component
  (instance $h)
  (export "wasi:http/incoming-handler@0.2.3" (instance $h)))
