"""Evaluation of reconstruction models: image metrics (PSNR, SSIM, LPIPS), geometry metrics
(Chamfer distance, F-score) and the ``fast3d eval`` loop over held-out views."""
