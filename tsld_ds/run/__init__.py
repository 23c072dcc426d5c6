"""Run plumbing the commands share, below them and above the numerical code: a run's typed
configuration and its options (`config`, `options`), DeepSpeed configs (`ds_config`), process
groups, ports and seeds (`distributed`), the dataset's rows on every rank (`rows`), checkpoints
and their universal form (`checkpoint`, `universal`), and the commands' shell (`cli`)."""
