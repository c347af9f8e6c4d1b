+ asr eval ../shared/data/fsdd --split dev --decoder beam --model models/default
