;; A WASI preview1 command module that declares four tables (reference
;; types allow more than one). With limits.tables below 4 instantiation must
;; fail naming the limit; otherwise it exits with 0.
(module
  (table $a 1 funcref)
  (table $b 1 funcref)
  (table $c 1 externref)
  (table $d 1 externref)
  (func (export "_start")))
