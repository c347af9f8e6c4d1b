+ asr eval ../shared/data/an4 --split dev --decoder beam --model models/default
