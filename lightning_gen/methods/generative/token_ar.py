"""An autoregressive Transformer over the codes of a VQ tokenizer ("taming transformers", Esser et al. 2021,
arXiv:2012.09841; the two-stage recipe of van den Oord et al. 2017 with a Transformer prior).

Autoregressive models are exact but slow on raw pixels (PixelCNN draws 784 subpixels for one 28 px
image). A frozen tokenizer (method=vq_autoencoder) turns an image into h x w code indices, 49 for 28 px
at f = 4; the Transformer models their raster sequence t_1..t_L:

    p(t | c) = prod_i p(t_i | c, t_<i),   c = the class token (the null class: unconditional)
    minimise  -log p(t | c) / L  (nats per token), t = tokenizer.encode(x)

Class conditioning is a start token per class (plus the null class, drawn with probability
``label_dropout`` in training), so one model is both conditional and unconditional and sampling can use
classifier-free guidance on the logits, l = (1 + w) l(t_<i, c) - w l(t_<i, null) (Ho & Salimans 2022;
on autoregressive token models: Yu et al. 2022, Parti; Sun et al. 2024, LlamaGen). Sampling draws the L
tokens one at a time with a KV cache (``nets/token_transformer.py``), from softmax(l / temperature)
restricted to the ``top_k`` most likely tokens and/or the smallest set of tokens holding ``top_p`` of the
probability (nucleus sampling, Holtzman et al. 2020), then decodes them with the tokenizer: images in [0, 1].

Likelihood. The token NLL is exact. Bits per dimension of an image go through the tokenizer: with the
decoder's discretised Gaussian p(x | t) (mean decoder(t), std ``decoder_std`` of the tokenizer), the
model of images is p(x) = sum_t p(t) p(x | t) >= p(t*) p(x | t*) for the tokens t* = encode(x), so

    -log p(x) <= -log p(t*) - log p(x | t*)        (token NLL + decoder NLL: an upper bound)

is what ``bits_per_dim`` reports (unconditionally, with the null class, unless labels are given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightning_gen.config import ConfigError, bounded
from lightning_gen.diffusion import cfg_combine
from lightning_gen.losses.classification import sequence_nll
from lightning_gen.methods.generative.frozen import FrozenChildren, checkpoint_of
from lightning_gen.methods.generative.generator import GenerativeConfig, GenerativeMethod, evaluating
from lightning_gen.methods.generative.vq_autoencoder import VQAutoencoder, load_tokenizer
from lightning_gen.nets.token_transformer import TokenTransformer
from lightning_gen.registry import register_method
from lightning_gen.stages import Stage1Input


@dataclass
class TokenARConfig(GenerativeConfig):
    # ckpt:<vq_autoencoder checkpoint>, or stage1: the experiment's stage-1 tokenizer, trained first if missing
    tokenizer: str | None = None
    codebook_size: int | None = bounded(None, 2)  # null: the tokenizer's; a number must be the tokenizer's
    width: int = bounded(256, 8)
    depth: int = bounded(6, 1)
    heads: int = bounded(8, 1)
    mlp_ratio: float = bounded(4.0, 1)
    dropout: float = bounded(0.1, 0, 1)
    conditional: bool = False  # a start token per class, with classifier-free guidance
    label_dropout: float = bounded(0.1, 0, 1)  # p(class -> null) in training
    # default sampling options (lgen sample temperature= top_k= top_p= guidance= override them)
    temperature: float = bounded(1.0, 1e-3, hint="the softmax temperature, > 0")
    top_k: int | None = bounded(None, 1, hint="sample among the k most likely tokens (null: all)")
    top_p: float | None = bounded(None, 1e-6, 1.0, hint="nucleus: the smallest set holding this probability")
    guidance: float = 0.0  # classifier-free guidance weight w on the logits
    optimizer: str = "adamw"
    lr: float = bounded(3e-4, 0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = bounded(0.01, 0)
    warmup_epochs: float = bounded(1.0, 0)
    ema_decay: float = 0.999


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab: int) -> None:
    """ValueError (lgen sample: one `lgen: error:` line) for options that would not sample."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and not top_k >= 1:
        raise ValueError(f"top_k must be at least 1 (the number of tokens to sample among), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (N, V) with every token outside the top k and outside the nucleus of mass p set to -inf.
    Written with masks of fixed shape (no data-dependent indexing)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        above = probs.cumsum(-1) - probs  # the mass of the tokens ranked before each: the first one has 0
        ordered = ordered.masked_fill(above >= top_p, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, ordered)
    return logits


def draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of softmax(logits), by the Gumbel-max trick: argmax(logits + G), G ~ Gumbel(0, 1)."""
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape, generator=generator, device=device).to(logits.device)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


@register_method("token_ar", TokenARConfig)
class TokenAR(FrozenChildren, GenerativeMethod):
    """Autoregressive Transformer over VQ tokens: class token, CFG on logits, KV cache, exact token NLL."""

    config_class = TokenARConfig
    monitor = ("val/loss", "min")  # nats per token on the validation split
    sample_options = ("temperature", "top_k", "top_p", "guidance")
    frozen_children = ("tokenizer",)
    stage1_input = Stage1Input("tokenizer", "tokenizer", "tokenizer", ("vq_autoencoder",), "vq_digits")

    def __init__(self, cfg: TokenARConfig, data=None, tokenizer: VQAutoencoder | None = None):
        """``tokenizer``: the frozen tokenizer of ``method.tokenizer``, when it is not to be read from there
        (rebuilt from a checkpoint's hyperparameters, or an untrained one of the stage-1 recipe)."""
        super().__init__(cfg, data)
        cfg, info = self.cfg, self.data_info
        where = f"method.tokenizer={cfg.tokenizer}"
        if tokenizer is None:
            tokenizer = load_tokenizer(
                checkpoint_of("method.tokenizer", cfg.tokenizer, "VQ tokenizer", "method=vq_autoencoder")
            )
        if not isinstance(tokenizer, VQAutoencoder):
            raise ConfigError(f"{where}: a {tokenizer.registry_name} model is no VQ tokenizer")
        tokenizer.check_data(info, f"the tokenizer of {where}")
        self.tokenizer = tokenizer.frozen()
        self.hparams["tokenizer"] = tokenizer.architecture()
        vocab = tokenizer.codebook_size
        if cfg.codebook_size is not None and cfg.codebook_size != vocab:
            raise ConfigError(
                f"method.codebook_size={cfg.codebook_size}, but the tokenizer of {where} has {vocab} codes: "
                f"set method.codebook_size={vocab} (or null), or give a tokenizer with {cfg.codebook_size} codes"
            )
        self.conditional = cfg.conditional and info.num_classes > 0
        self.grid = tokenizer.token_grid
        try:
            self.net = TokenTransformer(
                vocab,
                self.grid[0] * self.grid[1],
                info.num_classes + 1 if self.conditional else 1,
                cfg.width,
                cfg.depth,
                cfg.heads,
                cfg.mlp_ratio,
                cfg.dropout,
            )
        except ValueError as error:
            raise ConfigError(f"method.width / method.heads: {error}") from error
        self.setup_ema("net")

    @classmethod
    def from_hyperparameters(cls, cfg: TokenARConfig, data, hparams: dict) -> TokenAR:
        # the checkpoint holds the tokenizer's architecture here and its weights in the state dict
        architecture = hparams.get("tokenizer")
        if architecture is None:
            return cls(cfg, data)
        return cls(cfg, data, tokenizer=VQAutoencoder.from_architecture(architecture))

    @property
    def length(self) -> int:
        return self.grid[0] * self.grid[1]

    # ---------------------------------------------------------------- tokens
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> their raster sequences of codes (N, L)."""
        return self.tokenizer.encode(images).flatten(1)

    def start_tokens(self, labels: torch.Tensor | None, n: int, device) -> torch.Tensor:
        """The class token of each sequence: its class, or the null class (unconditional models: 0)."""
        if not self.conditional:
            return torch.zeros(n, dtype=torch.long, device=device)
        null = self.data_info.num_classes
        return torch.full((n,), null, dtype=torch.long, device=device) if labels is None else labels

    def nll(self, net, tokens: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """Exact -log p(tokens | start) per sequence, in nats."""
        return sequence_nll(net(tokens, starts), tokens)

    # ---------------------------------------------------------------- training
    def step(self, batch, stage: str) -> torch.Tensor:
        tokens = self.tokenize(batch["image"])
        labels = batch["label"]
        if self.conditional:  # training: classifier-free guidance's label dropout; validation: true labels
            labels = self.drop_labels(labels, self.cfg.label_dropout if stage == "train" else 0.0)
        nll = self.nll(self.net, tokens, self.start_tokens(labels, len(tokens), tokens.device))
        loss = nll.mean() / self.length
        self.log_loss(stage, loss)
        train = stage == "train"
        self.log(
            f"{stage}/bits_per_token", loss / math.log(2), on_step=train, on_epoch=True, sync_dist=not train
        )
        return loss

    def training_step(self, batch, batch_idx):
        return self.step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.step(batch, "val")

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n, cond=None, generator=None, temperature=None, top_k=None, top_p=None, guidance=None):
        self.check_sample_options(cond, {})
        cfg = self.cfg
        temperature = cfg.temperature if temperature is None else temperature
        top_k = cfg.top_k if top_k is None else top_k
        top_p = cfg.top_p if top_p is None else top_p
        guidance = cfg.guidance if guidance is None else guidance
        check_sampling(temperature, top_k, top_p, self.net.vocab)
        if guidance and not self.conditional:
            raise ValueError("guidance needs a conditional model (method.conditional=true)")
        tokens = self.sample_tokens(
            n, self.sample_labels(n, cond), guidance, temperature, top_k, top_p, generator
        )
        return self.tokenizer.decode(tokens.view(n, *self.grid))

    @torch.no_grad()
    def sample_tokens(self, n, labels, guidance, temperature, top_k, top_p, generator) -> torch.Tensor:
        """(n, L) tokens drawn one position at a time with the KV cache; with guidance the conditional and
        null-class sequences run as one batch of 2n."""
        guided = self.conditional and guidance != 0
        starts = self.start_tokens(labels, n, self.device)
        if guided:
            starts = torch.cat([starts, self.start_tokens(None, n, self.device)])
        tokens = torch.empty(n, self.length, dtype=torch.long, device=self.device)
        with evaluating(self.sampling_net()) as net:
            cache = net.new_cache(len(starts), net.position)
            token = None
            for i in range(self.length):
                step_input = token if not guided or token is None else torch.cat([token, token])
                logits = net.step(cache, starts=starts, token=step_input).float()
                if guided:
                    logits = cfg_combine(*logits.chunk(2), guidance)
                token = draw(filter_logits(logits / temperature, top_k, top_p), generator)
                tokens[:, i] = token
        return tokens

    # ---------------------------------------------------------------- likelihood
    @torch.no_grad()
    def bits_per_dim_bound(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        """Per image (N,): ``bits_per_dim`` = (token NLL + decoder NLL) / (D ln 2), an upper bound on the
        image's -log2 p(x) / D; its two parts; and the token NLL in bits per token. Unconditional (the
        null class) unless ``labels`` are given to a conditional model."""
        tokens = self.tokenize(images)
        with evaluating(self.sampling_net()) as net:
            token_nll = self.nll(net, tokens, self.start_tokens(labels, len(tokens), tokens.device)).double()
        decoder_nll = self.tokenizer.decoder_nll(images, tokens.view(-1, *self.grid))
        per_dim = images[0].numel() * math.log(2)
        return {
            "bits_per_dim": (token_nll + decoder_nll) / per_dim,
            "token_bits_per_dim": token_nll / per_dim,
            "decoder_bits_per_dim": decoder_nll / per_dim,
            "bits_per_token": token_nll / (self.length * math.log(2)),
        }
