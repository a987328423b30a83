"""Data generation, above the models: procedural Gaussian assets rendered into multi-view shards
(assets, procedural: ``fast3d datagen procedural``), the pretrained-model pipeline (pipeline:
``fast3d datagen pipeline``) and VFusion3D's quality filter (quality: ``fast3d datagen
train-filter``). What they write is fast3d.data's shard format."""
