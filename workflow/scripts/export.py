from pathlib import Path

from physis import logs
from physis.serving import export

logs.setup(snakemake.log[0])
export(Path(snakemake.input.summary).parent, snakemake.output[0], onnx=snakemake.params.onnx)
