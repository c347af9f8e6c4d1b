+ asr eval ../shared/data/an4 --split dev --decoder beam --mode streaming --model models/default
