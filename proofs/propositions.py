"""The propositions registry: every SPEC proposition with its three checks.

Each entry names the proposition, states it in words and LaTeX, lists the operators it
concerns, and links to its symbolic proof (:mod:`proofs.symbolic`), its high-precision check
(:mod:`proofs.highprec`) and its hypothesis properties (``property_tests`` functions, run by
``glora verify``; contract-suite node ids are listed for reference).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Proposition:
    """One proposition of SPEC.md and where it is checked."""

    id: str
    title: str
    statement: str
    latex: str
    operators: tuple[str, ...]
    properties: tuple[str, ...]  # "module:function" in property_tests, run by glora verify
    contract: tuple[str, ...] = ()  # pytest node ids in the contract suite (reference)

    @property
    def coq(self) -> tuple[str, ...]:
        """The Coq theorems that prove this proposition (empty: not machine-checked)."""
        return COQ_THEOREMS.get(self.id, ())

    @property
    def coq_scope(self) -> str:
        """What the Coq statements cover, or why there are none."""
        return COQ_SCOPE.get(self.id) or COQ_NOT_CHECKED.get(self.id, "not machine-checked")


PROPOSITIONS: tuple[Proposition, ...] = (
    Proposition(
        "P1",
        "projection of the mean",
        "The GLoRA server update is the orthogonal projection of the mean update onto the "
        "consensus subspace.",
        r"U_{\mathrm{ref}} S = U_{\mathrm{ref}} U_{\mathrm{ref}}^\top \bar W",
        ("glora", "glora_svd"),
        ("test_propositions:test_P1_server_update_is_the_projection_of_the_mean",),
    ),
    Proposition(
        "P2",
        "exactness (paper's Proposition 1)",
        "If R >= dim sum_i col(B_i) and all p_i > 0, the server update equals the mean update; "
        "in particular for one client, and for coinciding client subspaces with R = r.",
        r"R \ge \dim \textstyle\sum_i \mathrm{col}(B_i) \Rightarrow U_{\mathrm{ref}} S = \bar W",
        ("glora", "glora_svd"),
        (
            "test_propositions:test_P2_exact_when_R_spans_the_union",
            "test_propositions:test_P2_single_client_is_reproduced_at_its_own_rank",
            "test_propositions:test_P2_coinciding_subspaces_with_R_equal_r",
        ),
    ),
    Proposition(
        "P3",
        "gauge invariance (paper's Proposition 2)",
        "K, span(U_ref) and U_ref S are unchanged by per-client gauges G_i in GL(r_i).",
        r"(B_i, A_i) \mapsto (B_i G_i, G_i^{-1} A_i) \Rightarrow K, P_{U_{\mathrm{ref}}}, "
        r"U_{\mathrm{ref}} S \text{ unchanged}",
        ("glora", "glora_svd", "glora_residual", "glora_svd_residual"),
        ("test_propositions:test_P3_gauge_invariance_of_K_subspace_and_update",),
        ("property_tests/test_contract.py::test_contract[glora-gauge_invariant_GL]",),
    ),
    Proposition(
        "P4",
        "rank-compatible readout",
        "B^(r) A^(r) is a best rank-r approximation of U_ref S (error^2 = sum_{j>r} s_j(S)^2); "
        "readouts are nested in r, readout(R) reproduces U_ref S, the error is monotone in r.",
        r"\|B^{(r)}A^{(r)} - U_{\mathrm{ref}}S\|_F^2 = \textstyle\sum_{j>r}\sigma_j(S)^2",
        ("glora", "glora_svd", "flexlora", "svd_mean"),
        (
            "test_propositions:test_P4_readout_is_best_nested_exact_at_R_and_monotone",
            # at U_ref S = W_bar: FlexLoRA's and svd_mean's certificate is the spectrum's tail
            "test_certificate:test_the_svd_operators_certify_their_truncation_by_the_spectrum",
        ),
        ("property_tests/test_contract.py::test_contract[glora-rank_compatible]",),
    ),
    Proposition(
        "P5",
        "scale robustness",
        "Scaling one client's update by c > 0 leaves K and U_ref unchanged.",
        r"B_i \mapsto c B_i \Rightarrow K, U_{\mathrm{ref}} \text{ unchanged}",
        ("glora", "glora_svd"),
        ("test_propositions:test_P5_scaling_one_client_leaves_K_and_U_ref_unchanged",),
        ("property_tests/test_contract.py::test_contract[glora-scale_robust_subspace]",),
    ),
    Proposition(
        "P6",
        "client permutation; zero weights",
        "The server update does not depend on the order of clients; zero-weight clients drop out.",
        r"\pi \in S_N: \; \mathrm{GLoRA}(\{B_{\pi i}, A_{\pi i}, p_{\pi i}\}) = "
        r"\mathrm{GLoRA}(\{B_i, A_i, p_i\})",
        ("all",),
        (
            "test_propositions:test_P6_permutation_invariance",
            "test_propositions:test_P6_zero_weight_clients_drop_out",
        ),
        ("property_tests/test_contract.py::test_contract[<every operator>-permutation_invariant]",),
    ),
    Proposition(
        "P7",
        "factor-averaging error identity",
        "sum_i p_i B_i A_i - B_bar A_bar = sum_i p_i (B_i - B_bar)(A_i - A_bar) when "
        "sum_i p_i = 1; FedIT is not gauge invariant.",
        r"\bar W - \bar B \bar A = \textstyle\sum_i p_i (B_i - \bar B)(A_i - \bar A)",
        ("fedit",),
        ("test_identities:test_P7_factor_averaging_error_identity",),
        ("property_tests/test_contract.py::test_contract[fedit-gauge_invariant_GL]",),
    ),
    Proposition(
        "P8",
        "optimality gap (Eckart-Young)",
        "||W_bar - U_ref S||_F >= ||W_bar - best_R(W_bar)||_F, with equality when span(U_ref) "
        "contains the top-R left singular space of W_bar.",
        r"\|\bar W - U_{\mathrm{ref}}S\|_F \ge \|\bar W - [\bar W]_R\|_F",
        ("glora", "svd_mean"),
        ("test_verification:test_P8_optimality_gap",),
    ),
    Proposition(
        "P9",
        "Procrustes alignment",
        "Alignment preserves each client's product; R* minimises ||R^T A_i - A_ref|| over O(r); "
        "the soft rotation satisfies ||R_soft - I||_F <= 2 lambda ||R* - I||_F.",
        r"R^\star = \arg\min_{R \in O(r)} \|R^\top A_i - A_{\mathrm{ref}}\|_F",
        ("fedrot_lora", "fedrot_lora_soft"),
        (
            "test_identities:test_P9_procrustes_preserves_products_and_minimises",
            "test_identities:test_P9_soft_alignment_bound",
        ),
    ),
    Proposition(
        "P10",
        "exactness of stacking, shared A, residual folding",
        "FLoRA's stacking, FFA-LoRA's shared-A averaging and FedEx-LoRA's residual folding "
        "reproduce the mean update exactly.",
        r"[B_1 \cdots B_N][p_1A_1; \dots; p_NA_N] = \bar W",
        ("flora", "ffa_lora", "fedex_lora"),
        (
            "test_identities:test_P10_stacking_is_exact",
            "test_identities:test_P10_shared_A_averaging_is_exact_and_requires_a_shared_A",
            "test_identities:test_P10_fedex_residual_in_the_base_weight_layout",
        ),
    ),
    # Extensions beyond the paper (ours, SPEC "Extensions"): right side, certificate, auto rules.
    Proposition(
        "P11",
        "right-side consensus (ours)",
        "With V_i an orthonormal basis of row(A_i), K_R = sum_i p_i V_i V_i^T, V_ref = "
        "TopEig_R(K_R) and S' = sum_i p_i B_i (A_i V_ref), the update S' V_ref^T is the "
        "projection of the mean from the right, W_bar V_ref V_ref^T; exact when "
        "R >= dim sum_i row(A_i); invariant under per-client GL(r_i) gauges.",
        r"S' V_{\mathrm{ref}}^\top = \bar W V_{\mathrm{ref}} V_{\mathrm{ref}}^\top, \quad "
        r"R \ge \dim \textstyle\sum_i \mathrm{row}(A_i) "
        r"\Rightarrow S' V_{\mathrm{ref}}^\top = \bar W",
        ("glora_auto", "glora_auto_rank"),
        (
            "test_sided:test_P11_right_side_is_the_projection_of_the_mean",
            "test_sided:test_P11_right_side_gauge_invariance",
            "test_sided:test_P11_right_side_exact_when_R_spans_the_row_union",
        ),
    ),
    Proposition(
        "P12",
        "certificate identity",
        "For an orthogonal projector P (left U U^T W_bar, right W_bar V V^T), "
        "||W_bar - P W_bar||_F^2 = ||W_bar||_F^2 - ||P W_bar||_F^2 and ||P W_bar||_F = ||S||_F "
        "with S = U^T W_bar (right: W_bar V): the relative residual from factors.",
        r"\|\bar W - U S\|_F^2 = \|\bar W\|_F^2 - \|S\|_F^2, \quad S = U^\top \bar W",
        ("glora", "glora_svd", "glora_auto", "glora_auto_rank"),
        ("test_sided:test_P12_certificate_equals_the_measured_error",),
        ("property_tests/test_contract.py::test_contract[glora_auto-certified]",),
    ),
    Proposition(
        "P13",
        "auto-rank rule",
        "For nested top eigenvectors U_R, rho(R)^2 = 1 - sum_{j<=R} ||s_j||^2 / ||W_bar||^2 "
        "(s_j the rows of U_full^T W_bar) is non-increasing in R and 0 at R = dim of the union "
        "(P2): the smallest R with rho(R) <= tol exists and is at most that dimension.",
        r"\rho(R)^2 = 1 - \textstyle\sum_{j \le R} \|s_j\|^2 / \|\bar W\|_F^2 \downarrow, "
        r"\quad \rho(\dim \textstyle\sum_i \mathrm{col}(B_i)) = 0",
        ("glora_auto_rank",),
        (
            "test_sided:test_P13_auto_rank_is_the_smallest_certified_rank",
            "test_sided:test_P13_auto_rank_with_auto_side_takes_the_smaller_rank",
        ),
    ),
    Proposition(
        "P14",
        "auto side is optimal between the two",
        "The side='auto' residual is min(rho_left, rho_right) by construction, and both sides' "
        "residuals are gauge invariant (P3, P11), so the choice is gauge invariant.",
        r"\rho_{\mathrm{auto}} = \min(\rho_{\mathrm{left}}, \rho_{\mathrm{right}}), "
        r"\text{ both invariant under } (B_i, A_i) \mapsto (B_i G_i, G_i^{-1} A_i)",
        ("glora_auto", "glora_auto_rank"),
        ("test_sided:test_P14_auto_side_is_the_better_side",),
    ),
    Proposition(
        "P15",
        "the estimated certificate's upper bound (ours)",
        "With s Gaussian probes, X = mean ||(W_bar - U S) g_j||^2 is unbiased for "
        "||W_bar - U S||_F^2 = T and P(X <= (1 - eps) T) <= exp(-s eps^2 / 4); so "
        "sqrt(e^2 / (||S||^2 + e^2)) with e^2 = X / (1 - eps), eps = 2 sqrt(ln(1/delta) / s), "
        "bounds the relative residual with probability at least 1 - delta.",
        r"P\Big(\tfrac1s \textstyle\sum_j \|E g_j\|^2 \le (1-\varepsilon)\|E\|_F^2\Big) "
        r"\le e^{-s\varepsilon^2/4}",
        ("glora", "glora_auto"),
        ("test_certificate:test_P15_estimated_certificate_bound_holds",),
    ),
    Proposition(
        "P16",
        "the certificate from the two raw Gram matrices (ours)",
        "For W_bar = B diag(pw) A (stacked raw factors, column weights), gb = B^T B, "
        "ga = A A^T, Pa = diag(pw) ga diag(pw) and the stored basis X of full column rank: "
        "||W_bar||^2 = <Pa, gb> and ||P_X W_bar||^2 = tr((X^T X)^-1 (X^T B) Pa (X^T B)^T), so "
        "the certificate of span(X) is their difference: two m x m Gram matrices (one per "
        "side, shared by side='auto') and X^T B instead of a QR of the stacked factors.",
        r"\|\bar W - P_X\bar W\|_F^2 = \langle P_a, G_B\rangle - "
        r"\operatorname{tr}\big((X^\top X)^{-1} X^\top B P_a B^\top X\big)",
        ("glora", "glora_auto"),
        ("test_certificate:test_P16_gram_certificate_matches_the_qr_certificate",),
    ),
    Proposition(
        "L1",
        "low-rank Frobenius norms (used by every metric)",
        "||B A||_F = ||T A||_F for the thin QR B = Q T: distances need no d-by-k matrix.",
        r"\|QTA\|_F = \|TA\|_F",
        ("metrics",),
        ("test_verification:test_L1_lowrank_norms",),
    ),
)


def get(pid: str) -> Proposition:
    """The proposition with id ``pid``."""
    for p in PROPOSITIONS:
        if p.id == pid:
            return p
    raise KeyError(pid)


# ---------------------------------------------------------------------------------------------
# Machine-checked proofs (Coq + Mathematical Components, proofs/coq; checked by proofs.formal).
# Each proposition's Coq theorems (``Module.theorem``, full name ``GLoRA.Module.theorem``), what
# the Coq statements cover next to the statement above (where they are narrower), and why the
# others are not machine-checked. proofs/coq/README.md has every Coq statement in words.

COQ_THEOREMS: dict[str, tuple[str, ...]] = {
    "P1": (
        "Projection.P1_coords_are_projected_mean",
        "Projection.P1_projection_of_the_mean",
    ),
    "P2": (
        "Projection.P2_exactness",
        "Projection.P2_exact_if_factor_columns_in",
        "Projection.P2_exact_if_client_bases_in",
        "Projection.P2_single_client",
        "Projection.consensus_contains_clients",
        "Projection.P2_exact_if_consensus_range_in",
        "TopEig.top_eig_contains_range",
        "TopEig.consensus_rank_le",
        "TopEig.P2_exact_top_eig",
        "Spectral.spectral_theorem",
        "Spectral.top_eig_exists",
        "Spectral.P2_exact",
    ),
    "P3": (
        "Gauge.P3_projector_basis_change",
        "Gauge.P3_projector_of_column_space",
        "Gauge.P3_qr_basis_spans",
        "Gauge.P3_gauge_keeps_column_space",
        "Gauge.P3_gauge_keeps_product",
        "Gauge.P3_client_projector_gauge_invariant",
        "Gauge.P3_consensus_of_column_spaces",
        "Gauge.P3_mean_gauge_invariant",
        "Gauge.P3_consensus_gauge_invariant",
        "Gauge.P3_consensus_gauge_invariant_svd",
        "Gauge.P3_update_gauge_invariant",
        "Unique.top_eig_unique",
        "Unique.P3_update_gauge_invariant_top_eig",
    ),
    "P4": (
        "EckartYoung.ky_fan",
        "EckartYoung.eckart_young",
        "EckartYoung.P4_readout_is_best",
        "EckartYoung.P4_full_readout",
    ),
    "P5": ("Gauge.P5_consensus_scale_invariant", "Unique.P5_top_eig_scale_invariant"),
    "P6": (
        "Permutation.P6_weighted_sum_permutation",
        "Permutation.P6_weighted_sum_zero_weight",
        "Permutation.P6_total_weight_zero_weight",
        "Permutation.P6_mean_permutation",
        "Permutation.P6_consensus_permutation",
        "Permutation.P6_coords_permutation",
        "Permutation.P6_update_permutation",
        "Permutation.P6_right_coords_permutation",
        "Permutation.P6_fedit_permutation",
        "Permutation.P6_mean_zero_weight",
        "Permutation.P6_consensus_zero_weight",
        "Permutation.P6_coords_zero_weight",
        "Permutation.P6_right_coords_zero_weight",
    ),
    "P7": (
        "FedIT.P7_fedit_error_identity",
        "FedIT.P7_fedit_not_gauge_invariant",
    ),
    "P8": (
        "EckartYoung.P8_optimality_gap",
        "EckartYoung.P8_equality",
    ),
    "P9": (
        "Procrustes.tr_orth_psd",
        "Procrustes.P9_procrustes_optimal",
        "Procrustes.polar_of_svd",
        "Procrustes.P9_procrustes_svd",
    ),
    "P10": (
        "Exactness.P10_stacking_exact",
        "Exactness.P10_stacking_exact_weighted_B",
        "Exactness.P10_shared_A_exact",
        "Exactness.P10_shared_B_exact",
        "Exactness.P10_residual_fold",
        "Exactness.P10_transposed_residual_iff_symmetric",
        "Exactness.P10_transposed_residual_wrong_witness",
    ),
    "P11": (
        "Projection.P11_right_coords_are_projected_mean",
        "Projection.P11_right_projection_of_the_mean",
        "Projection.P11_right_exactness",
        "Projection.P11_exact_if_factor_rows_in",
        "Projection.P11_exact_if_right_consensus_range_in",
        "TopEig.P11_exact_top_eig",
        "Spectral.P11_exact",
        "Unique.P11_right_update_gauge_invariant_top_eig",
        "Gauge.P11_gauge_keeps_row_space",
        "Gauge.P11_client_projector_gauge_invariant",
        "Gauge.P11_right_consensus_gauge_invariant",
        "Gauge.P11_right_update_gauge_invariant",
    ),
    "P13": (
        "AutoRank.P13_residual_nonincreasing",
        "AutoRank.P13_residual_zero_at_union",
    ),
    "P14": ("AutoRank.P14_auto_side_is_the_better_side",),
    "P12": (
        "Certificate.P12_certificate_left",
        "Certificate.P12_kept_left",
        "Certificate.P12_certificate_left_coords",
        "Certificate.P12_certificate_right",
        "Certificate.P12_kept_right",
        "Certificate.P12_certificate_right_coords",
        "Certificate.P12_certificate_glora",
        "Certificate.P12_certificate_glora_right",
        "Certificate.P12_kept_le_total",
    ),
    "P16": (
        "GramCertificate.projX_pythagoras",
        "GramCertificate.P16_mean_norm",
        "GramCertificate.P16_kept_norm",
        "GramCertificate.P16_certificate",
    ),
    "L1": (
        "Certificate.L1_fro2_is_sum_of_squares",
        "Certificate.L1_orthonormal_left_factor",
        "Certificate.L1_lowrank_norm",
        "Certificate.L1_orthonormal_right_factor",
    ),
}

# Where the Coq statements are narrower than the registry's (details in proofs/coq/README.md).
COQ_SCOPE: dict[str, str] = {
    "P1": "full (no hypothesis on U_ref needed)",
    "P2": "full: for U_ref = TopEig_R(K) by definition (orthonormal eigenvectors of K whose "
    "eigenvalues bound the Rayleigh quotient off their span), p >= 0 and R >= dim sum col(U_i) "
    "give U_ref S = W_bar; such a U_ref exists (the spectral theorem, over any real closed field)",
    "P3": "full with a positive eigengap: TopEig_R(K) spans a subspace fixed by K, so per-client "
    "gauges leave U_ref S unchanged whichever TopEig_R the gauged round picks",
    "P4": "the optimality part, as Eckart-Young through TopEig_r(S S^T) (the top-r left singular "
    "vectors of S, whichever split of the singular values the factors use): U_ref Ut Ut^T S is at "
    "least as close to U_ref S as every product of inner dimension r; the full readout (r = R) "
    "reproduces U_ref S. Nestedness and the closed form sum_{j>r} s_j^2 are not stated",
    "P5": "full with a positive eigengap, for any c_i != 0: K unchanged, and so span(U_ref) "
    "(TopEig_R(K) is unique)",
    "P6": "full, for every weighted client sum (W_bar, K, S, S', FedIT)",
    "P7": "full: the identity, and an orthogonal-gauge witness that FedIT moves",
    "P8": "full: the best rank-R approximation as the projection onto a TopEig_R(W_bar W_bar^T) "
    "(Eckart-Young, proved); equality when col(U_ref) contains that subspace",
    "P9": "optimality: a polar factor of A_i A_ref^T (U V^T from its SVD) minimises "
    "||R^T A_i - A_ref|| over O(r); product preservation is Gauge.P3_gauge_keeps_product; the "
    "soft-rotation bound is not machine-checked (its sympy proof and 50-digit check stand)",
    "P10": "full; the transposed FedEx residual: an iff with symmetry of the residual (d = k) "
    "and a witness where it is not symmetric",
    "P11": "full, as P1-P3 on the right: exactness with an existing TopEig_R(K_R), gauge "
    "invariance with a positive eigengap",
    "P12": "full, both sides, and ||S||^2 <= ||W||^2 over an ordered field",
    "P13": "monotonicity along any nested orthonormal bases, and 0 at R >= dim sum col(U_i) "
    "(through P2); the existence of the smallest certified R follows",
    "P14": "the decision rule: the kept side's residual is at most either side's; the gauge "
    "invariance of both residuals is P3's and P11's",
    "P16": "full, over any field: W = B D A for any m x m D (the operator's D is the diagonal "
    "of weights), the projector onto the columns of any X with X^T X invertible",
    "L1": "full, as squared norms (no square roots)",
}

COQ_NOT_CHECKED: dict[str, str] = {
    "P15": "a probability bound on Gaussian quadratic forms needs measure theory and the "
    "Gaussian integral, beyond mathcomp 1.15's algebra",
}
