"""Synthetic renal pathology with complete ground truth: what the demo runs on.

- :mod:`~omniseg.synthetic.render`: draws tissue (tubules, glomeruli, arteries, capillaries) in
  four stains, with the six tissues' full masks;
- :mod:`~omniseg.synthetic.cohort`: a cohort of 40x ROIs with partial labels, in the sample-sheet
  layout real data uses (``rois.tsv``);
- :mod:`~omniseg.synthetic.slide`: a pyramidal 40x slide and its full truth.

Reading real data lives elsewhere: ROIs in :mod:`omniseg.data`, slides in :mod:`omniseg.wsi.slide`.
"""
