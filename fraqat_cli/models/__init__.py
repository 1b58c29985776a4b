"""Model families and their diffusers pipelines: loading (real weights or tiny twins), the family
conventions, noise, the toy teacher's parts, and generation with a pipeline."""
