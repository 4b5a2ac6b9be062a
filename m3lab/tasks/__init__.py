"""lm-eval tasks m3lab ships (YAML + data hooks). lm-eval finds them through `--include_path <this folder>`,
which `m3lab.evals.build_command` adds whenever an eval names one of them."""
