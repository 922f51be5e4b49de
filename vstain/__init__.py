"""vstain: 3D multi-channel virtual fluorescent staining from brightfield z-stacks, as an executable
study. Data flow: FOVs (:mod:`vstain.data.allen`, :mod:`vstain.data.simulate`, stage :mod:`vstain.data.stage`) ->
focus window (:mod:`vstain.preprocess.focus`) -> denoised targets (:mod:`vstain.preprocess.denoise`, stage
:mod:`vstain.preprocess.stages`) -> processed set (:mod:`vstain.preprocess.processed`) -> models (:mod:`vstain.models`,
:mod:`vstain.training.unet`, :mod:`vstain.training.wgan`) -> predictions (:mod:`vstain.inference.infer`) -> evaluation
(:mod:`vstain.evaluate`); the book's machinery is :mod:`vstain.book`."""
