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
