"""The book's chapters, one module each (`pretraining`, `dense_equivalent`, `tasks`,
`inference`, `premise`), on shared `style` and step `records`; `paper` holds the paper's numbers
and `scaling` Clark et al.'s routed scaling law."""
