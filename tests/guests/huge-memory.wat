;; A WASI command whose memory declares a minimum of 65536 pages (4 GiB):
;; no instance fits under a `limits.memory` below that, which `corral check`
;; and corrald's reconcile must say before any zygote starts.
(module
  (memory (export "memory") 65536)
  (func (export "_start")))
