"""Named presets for `moe train --preset NAME`: one TOML file per preset (installed as train.configs)."""
