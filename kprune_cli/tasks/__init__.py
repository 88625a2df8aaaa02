"""Tasks: specs (GLUE, SQuAD, the generated demo), loading their data from the hub or local files,
tokenisation, metrics, and the calibration sample drawn from a train split or unlabeled text."""
