"""Operations around the stages: the stage CLI, Prefect links and UI artifacts, the DVC graph, distributed
launch, the MLflow record, the model registry, output manifests, multi-adapter generation."""
