from pathlib import Path

import pandas as pd

from physis import logs
from physis.inference import predict_frame
from physis.io import write_parquet

logs.setup(snakemake.log[0])
manifest = pd.read_parquet(snakemake.input.manifest)
scores = predict_frame(Path(snakemake.input.summary).parent, manifest, Path(snakemake.input.index).parent)
write_parquet(scores, snakemake.output[0])
