+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default --mode offline --worst 0 --json runs/robustness/vadbatched/clean__offline.json
