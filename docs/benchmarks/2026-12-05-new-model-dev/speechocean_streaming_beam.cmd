+ asr eval ../shared/data/speechocean762 --split dev --decoder beam --mode streaming --model models/default
