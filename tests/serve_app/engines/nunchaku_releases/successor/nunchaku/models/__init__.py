"""TEST DOUBLE of the successor nunchaku's transformers: its signatures and calls, diffusers' computation."""

from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel
from nunchaku_double_loading import LoadsBesideTheFile  # ../../_common, put on sys.path by the test fixture


class NunchakuZImageRopeHook:
    """Stands in for the successor's rope pre-hook; counts the attention calls it sees."""

    calls = 0

    def __call__(self, module, args, kwargs):
        NunchakuZImageRopeHook.calls += 1


class NunchakuZImageTransformer2DModel(LoadsBesideTheFile, ZImageTransformer2DModel):
    def register_rope_hook(self, rope_hook):
        self.rope_hook_handles = [layer.attention.register_forward_pre_hook(rope_hook, with_kwargs=True)
                                  for layer in self.layers]

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


class NunchakuQwenImageTransformer2DModel(LoadsBesideTheFile, QwenImageTransformer2DModel):
    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                img_shapes=None, txt_seq_lens=None, guidance=None, attention_kwargs=None,
                controlnet_block_samples=None, return_dict=True):
        text_seq_len = encoder_hidden_states.shape[1]
        self.pos_embed(img_shapes, max_txt_seq_len=text_seq_len, device=hidden_states.device)
        return super().forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                               encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
                               img_shapes=img_shapes, guidance=guidance, attention_kwargs=attention_kwargs,
                               controlnet_block_samples=controlnet_block_samples, return_dict=return_dict)
