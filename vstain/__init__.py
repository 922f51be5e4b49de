"""vstain: 3D multi-channel virtual fluorescent staining from brightfield z-stacks, as an executable
study. Data flow: FOVs (:mod:`vstain.allen`, :mod:`vstain.simulate`, stage :mod:`vstain.data`) ->
focus window (:mod:`vstain.focus`) -> denoised targets (:mod:`vstain.denoise`, stage
:mod:`vstain.preprocess`) -> processed set (:mod:`vstain.dataset`) -> models (:mod:`vstain.models`,
:mod:`vstain.train`, :mod:`vstain.wgan`) -> predictions (:mod:`vstain.infer`) -> evaluation
(:mod:`vstain.evaluate`); the book's machinery is :mod:`vstain.book`."""
