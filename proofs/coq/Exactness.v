(* GLoRA.Exactness: P10, exactness of stacking (FLoRA), of shared-factor averaging (FFA-LoRA,
   RoLoRA's rounds) and of residual folding (FedEx-LoRA), and what the transposed residual does. *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

Section Stacking.
Variable R : comRingType.
Variables (N d k : nat) (r : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

(* FLoRA, SPEC's layout: [B_1 ... B_N] [p_1 A_1; ...; p_N A_N] = W_bar, as mathcomp block
   matrices (mxrow / mxcol) of N blocks with client ranks r i (the stacked rank is sum_i r i). *)
Theorem P10_stacking_exact :
  mxrow B *m mxcol (fun i => p i *: A i) = mean_update p B A.
Proof. by rewrite mul_mxrow_mxcol; apply: eq_bigr => i _; rewrite scalemxAr. Qed.

(* The same with the weights on the B blocks: [p_1 B_1 ... p_N B_N] [A_1; ...; A_N] = W_bar. *)
Theorem P10_stacking_exact_weighted_B :
  mxrow (fun i => p i *: B i) *m mxcol A = mean_update p B A.
Proof. by rewrite mul_mxrow_mxcol; apply: eq_bigr => i _; rewrite scalemxAl. Qed.

End Stacking.

Section SharedFactor.
Variable R : comRingType.
Variables (N d k r : nat) (p : 'I_N -> R).

(* FFA-LoRA (and RoLoRA's B round): with A shared, sum_i p_i B_i A = (sum_i p_i B_i) A. *)
Theorem P10_shared_A_exact (B : 'I_N -> 'M[R]_(d, r)) (A0 : 'M[R]_(r, k)) :
  mean_update p B (fun _ => A0) = factor_mean p B *m A0.
Proof. exact: wsum_mulr. Qed.

(* RoLoRA's A round: with B shared, sum_i p_i B A_i = B (sum_i p_i A_i). *)
Theorem P10_shared_B_exact (B0 : 'M[R]_(d, r)) (A : 'I_N -> 'M[R]_(r, k)) :
  mean_update p (fun _ => B0) A = B0 *m factor_mean p A.
Proof. exact: wsum_mull. Qed.

End SharedFactor.

Section Residual.
Variable R : comRingType.
Variables (N d k r : nat) (p : 'I_N -> R).
Variables (B : 'I_N -> 'M[R]_(d, r)) (A : 'I_N -> 'M[R]_(r, k)).

(* FedEx-LoRA: the base W0 plus FedIT's product plus the residual W_bar - B_bar A_bar, all in
   the base weight's own layout, is W0 + W_bar. *)
Theorem P10_residual_fold (W0 : 'M[R]_(d, k)) :
  W0 + fedit p B A + (mean_update p B A - fedit p B A) = W0 + mean_update p B A.
Proof. by rewrite -addrA (addrC (fedit p B A)) subrK. Qed.

End Residual.

Section TransposedResidual.
Variable R : comRingType.
Variables (N d r : nat) (p : 'I_N -> R).
Variables (B : 'I_N -> 'M[R]_(d, r)) (A : 'I_N -> 'M[R]_(r, d)).

(* Adding the transposed residual (W_bar - B_bar A_bar)^T to the base only type-checks when
   the weight is square (d = k; otherwise the shapes differ), and then it gives W0 + W_bar if
   and only if the residual is symmetric. *)
Theorem P10_transposed_residual_iff_symmetric (W0 : 'M[R]_d) :
  W0 + fedit p B A + (mean_update p B A - fedit p B A)^T = W0 + mean_update p B A <->
  (mean_update p B A - fedit p B A)^T = mean_update p B A - fedit p B A.
Proof.
rewrite -(P10_residual_fold p B A W0); split; first by move/addrI.
by move=> ->.
Qed.

End TransposedResidual.

Section TransposedResidualWitness.
Variable R : numFieldType.

(* The transposed residual is really wrong: two clients with weights 1/2 and 2 x 2 weights
   (rank-1 factors B_1 = e_1, A_1 = e_2^T, client 2 zero) have the residual e_1 e_2^T / 4, which
   is not symmetric, so W0 + B_bar A_bar + residual^T differs from W0 + W_bar for every W0. *)
Theorem P10_transposed_residual_wrong_witness :
  exists (p : 'I_2 -> R) (B : 'I_2 -> 'M[R]_(2, 1)) (A : 'I_2 -> 'M[R]_(1, 2)),
    [/\ \sum_(i < 2) p i = 1, forall i, 0 <= p i &
        forall W0 : 'M[R]_2,
          W0 + fedit p B A + (mean_update p B A - fedit p B A)^T != W0 + mean_update p B A].
Proof.
pose h : R := 2^-1.
have hh : h + h = 1 by rewrite /h -mulr2n -mulr_natr mulVf // pnatr_eq0.
pose B (i : 'I_2) : 'M[R]_(2, 1) := if val i == 0%N then delta_mx 0 0 else 0.
pose A (i : 'I_2) : 'M[R]_(1, 2) := if val i == 0%N then delta_mx 0 1 else 0.
exists (fun _ => h), B, A; split.
- by rewrite big_ord_recl big_ord1.
- by move=> i; rewrite /h invr_ge0 ler0n.
move=> W0; apply/negP => /eqP /P10_transposed_residual_iff_symmetric.
rewrite /mean_update /fedit /factor_mean !big_ord_recl !big_ord0 /B /A /= !addr0.
rewrite !mul0mx !scaler0 !addr0 -scalemxAl -scalemxAr mul_delta_mx scalerA -scalerBl.
move=> /matrixP /(_ 0 1); rewrite !mxE /= mulr0 mulr1 => /esym /eqP.
have -> : h - h * h = h * h by rewrite -{1}(mulr1 h) -hh mulrDr addrK.
by rewrite mulf_eq0 orbb /h invr_eq0 pnatr_eq0.
Qed.

End TransposedResidualWitness.
