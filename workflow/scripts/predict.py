from pathlib import Path

import pandas as pd

from physis import logs
from physis.evaluate import detection_metrics
from physis.inference import predict_frame
from physis.io import write_parquet

logs.setup(snakemake.log[0])
manifest = pd.read_parquet(snakemake.input.manifest)
preset_dir = Path(snakemake.input.index).parent
scores, boxes = predict_frame(Path(snakemake.input.summary).parent, manifest, preset_dir)
detection = (detection_metrics(boxes, pd.read_parquet(preset_dir / "boxes.parquet"), scores)
             if snakemake.params.detects else detection_metrics(boxes.iloc[0:0], boxes.iloc[0:0], scores.iloc[0:0]))
write_parquet(boxes, snakemake.output.boxes)
write_parquet(detection, snakemake.output.detection)
write_parquet(scores, snakemake.output.scores)
