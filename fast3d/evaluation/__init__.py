"""Evaluation as the papers report it: image metrics (PSNR, SSIM / MS-SSIM, LPIPS), geometry metrics
(Chamfer distance, F-score), CLIP-R precision and CLIP text / image similarity, FID; benchmark sets
(GSO-style object folders, fast3d shards, prompt lists, reference image folders); the evaluation loop
of generators; and the report ``fast3d eval`` writes (JSON + paper-style Markdown, resumable rows,
``--compare``). Every metric names its backbone; nothing is downloaded."""
