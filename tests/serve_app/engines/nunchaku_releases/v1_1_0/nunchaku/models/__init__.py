"""TEST DOUBLE of nunchaku 1.1.0's transformers: v1.1.0's signatures and calls, diffusers' computation."""

from diffusers import QwenImageTransformer2DModel, ZImageTransformer2DModel
from nunchaku_double_loading import QwenImageLoading, ZImageLoading  # ../../_common, on sys.path in the tests


class NunchakuZImageTransformer2DModel(ZImageLoading, ZImageTransformer2DModel):
    """v1.1.0 keeps diffusers' forward: only loading differs (and no per-block offload)."""


class NunchakuQwenImageTransformer2DModel(QwenImageLoading, QwenImageTransformer2DModel):
    def forward(self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, timestep=None,
                img_shapes=None, txt_seq_lens=None, guidance=None, attention_kwargs=None,
                controlnet_block_samples=None, return_dict=True):
        # v1.1.0's rope call, written for the diffusers before QwenEmbedRope took max_txt_seq_len.
        self.pos_embed(img_shapes, txt_seq_lens, device=hidden_states.device)
        return super().forward(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                               encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
                               img_shapes=img_shapes, guidance=guidance, attention_kwargs=attention_kwargs,
                               controlnet_block_samples=controlnet_block_samples, return_dict=return_dict)
