"""TEST DOUBLE of the successor nunchaku's transformers: its signatures and calls, diffusers' computation."""

from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel
from nunchaku_double_loading import QwenImageLoading, ZImageLoading  # ../../_common, on sys.path in the tests


class NunchakuZImageRopeHook:
    """Stands in for the successor's rope pre-hook, which swaps the ``freqs_cis`` keyword of each attention
    call for nunchaku's packed layout (and leaves a call without it alone). The double leaves the tensor as
    it is and records, for every hook instance alike, each attention module it ran on and whether that call
    carried ``freqs_cis`` as a keyword."""

    calls = 0
    seen: list = []  # (attention module, got freqs_cis as a keyword)

    def __call__(self, module, args, kwargs):
        NunchakuZImageRopeHook.calls += 1
        NunchakuZImageRopeHook.seen.append((module, "freqs_cis" in kwargs))


class NunchakuZImageTransformer2DModel(ZImageLoading, ZImageTransformer2DModel):
    # The real _patch_model sets it from the checkpoint's quantization_config (default False); True leaves
    # the refiners unquantized, and then unhooked.
    skip_refiners = False

    def register_rope_hook(self, rope_hook):
        hooked = list(self.layers)
        if not self.skip_refiners:
            hooked += [*self.noise_refiner, *self.context_refiner]
        self.rope_hook_handles = [block.attention.register_forward_pre_hook(rope_hook, with_kwargs=True)
                                  for block in hooked]

    def unregister_rope_hook(self):
        for handle in self.rope_hook_handles:
            handle.remove()
        self.rope_hook_handles.clear()

    def forward(self, x, t, cap_feats, patch_size=2, f_patch_size=1, return_dict=True):
        rope_hook = NunchakuZImageRopeHook()
        self.register_rope_hook(rope_hook)
        try:
            # The successor's call, positional in the order of an older diffusers' forward.
            return super().forward(x, t, cap_feats, patch_size, f_patch_size, return_dict)
        finally:
            self.unregister_rope_hook()


class NunchakuQwenImageTransformer2DModel(QwenImageLoading, QwenImageTransformer2DModel):
    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                img_shapes=None, txt_seq_lens=None, guidance=None, attention_kwargs=None,
                controlnet_block_samples=None, return_dict=True):
        text_seq_len = encoder_hidden_states.shape[1]
        self.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)
        return super().forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                               encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
                               img_shapes=img_shapes, guidance=guidance, attention_kwargs=attention_kwargs,
                               controlnet_block_samples=controlnet_block_samples, return_dict=return_dict)
