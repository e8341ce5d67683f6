"""A tiny, deterministic DELG-signature SavedModel for tests (no weights, builds in seconds).

Same serving signature as the official DELG exports (docs/design.md, "Model signature"): inputs ``input_image``
uint8 [H,W,3], ``input_scales`` f32 [S], ``input_max_feature_num`` i32, ``input_abs_thres`` f32,
``input_global_scales_ind`` i32 [G]; outputs ``boxes`` [N,4] (y0,x0,y1,x1, original pixels),
``features`` [N,128], ``scales`` [N], ``scores`` [N,1], ``global_descriptors`` [G,48].

What it computes (image-dependent, so tests can check meaning):
- per scale s the image is resized by s and normalised as (x-128)/128;
- global row = 4x4 area-averaged colour grid (48 values) + 1 (so it is never zero);
- local features on a grid of CELL x CELL patches: descriptor = fixed random projection of the
  patch pixels, score = patch standard deviation (local contrast), box = the patch / s;
- features with score >= abs_thres (<= 0: no threshold) are kept, merged over scales, and the
  top ``max_feature_num`` by score are returned.
"""

from __future__ import annotations

from pathlib import Path

CELL = 8
GLOBAL_DIM = 48


def build_fake_delg(out_dir: str | Path) -> Path:
    """Write the fake DELG SavedModel to `out_dir` and return the path."""
    import numpy as np

    from landmarks.delg.delg_io import serving_input_signature
    from landmarks.utils.tfquiet import tf

    proj = tf.constant(np.random.default_rng(0).standard_normal((CELL * CELL * 3, 128)).astype(np.float32))

    class FakeDelg(tf.Module):
        @tf.function(input_signature=serving_input_signature())
        def serve(self, input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
            img = (tf.cast(input_image, tf.float32) - 128.0) / 128.0
            hw = tf.cast(tf.shape(img)[:2], tf.float32)
            n_s = tf.shape(input_scales)[0]
            glob = tf.TensorArray(tf.float32, size=n_s)
            boxes = tf.TensorArray(tf.float32, size=n_s, infer_shape=False)
            feats = tf.TensorArray(tf.float32, size=n_s, infer_shape=False)
            scs = tf.TensorArray(tf.float32, size=n_s, infer_shape=False)
            scores = tf.TensorArray(tf.float32, size=n_s, infer_shape=False)
            for i in tf.range(n_s):
                s = input_scales[i]
                size = tf.maximum(tf.cast(tf.round(hw * s), tf.int32), 1)
                x = tf.image.resize(img[None], size, method="bilinear", antialias=False)
                g = tf.image.resize(x, [4, 4], method="area")
                glob = glob.write(i, tf.reshape(g, [-1]) + 1.0)
                p = tf.image.extract_patches(x, [1, CELL, CELL, 1], [1, CELL, CELL, 1], [1, 1, 1, 1], "VALID")
                gh, gw = tf.shape(p)[1], tf.shape(p)[2]
                p = tf.reshape(p, [-1, CELL * CELL * 3])
                desc = tf.matmul(p, proj)
                score = tf.math.reduce_std(p, axis=1)
                yy, xx = tf.meshgrid(tf.range(gh), tf.range(gw), indexing="ij")
                y0 = tf.cast(tf.reshape(yy, [-1]) * CELL, tf.float32)
                x0 = tf.cast(tf.reshape(xx, [-1]) * CELL, tf.float32)
                b = tf.stack([y0, x0, y0 + CELL, x0 + CELL], axis=1) / s
                boxes = boxes.write(i, b)
                feats = feats.write(i, desc)
                scs = scs.write(i, tf.fill(tf.shape(score), s))
                scores = scores.write(i, score)
            boxes_c = tf.reshape(boxes.concat(), [-1, 4])
            feats_c = tf.reshape(feats.concat(), [-1, 128])
            scs_c = tf.reshape(scs.concat(), [-1])
            scores_all = tf.reshape(scores.concat(), [-1])
            keep = tf.where(tf.logical_or(input_abs_thres <= 0.0, scores_all >= input_abs_thres))[:, 0]
            scores_c = tf.gather(scores_all, keep)
            k = tf.minimum(tf.maximum(input_max_feature_num, 0), tf.shape(scores_c)[0])
            top = tf.math.top_k(scores_c, k=k, sorted=True).indices
            top = tf.gather(keep, top)
            return {
                "boxes": tf.gather(boxes_c, top),
                "features": tf.gather(feats_c, top),
                "scales": tf.gather(scs_c, top),
                "scores": tf.reshape(tf.gather(scores_all, top), [-1, 1]),
                "global_descriptors": tf.gather(glob.stack(), input_global_scales_ind),
            }

    out_dir = Path(out_dir)
    m = FakeDelg()
    tf.saved_model.save(m, str(out_dir), signatures={"serving_default": m.serve.get_concrete_function()})
    return out_dir


if __name__ == "__main__":
    import sys

    print(build_fake_delg(sys.argv[1] if len(sys.argv) > 1 else "fake_delg"))
