"""What is not product yet: objectives with no reported result, kept runnable apart from the product.

The product (`drivekd.distill`, `drivekd.train`) never imports this package; it imports the product
and extends it through the product's own hooks (`run_distill(..., distiller_class=)`,
`run_sft(..., objective=)`). Each objective has its config class (`config.py`) and a command under
`drivekd experimental`; its config and behaviour may change without notice.

- `reweight`: online loss reweighting from gradient norms (`drivekd experimental distill-reweight`).
- `tag_attention`: an SFT loss pulling one head's attention onto the tagged object's visual token
  (`drivekd experimental sft-tag-attention`).
"""
