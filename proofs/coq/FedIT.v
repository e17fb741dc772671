(* GLoRA.FedIT: P7, the factor-averaging (FedIT) error identity, and a witness that FedIT is
   not gauge invariant (not even under orthogonal gauges). *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

Section P7.
Variable R : comRingType.
Variables (N d k r : nat) (p : 'I_N -> R).
Variables (B : 'I_N -> 'M[R]_(d, r)) (A : 'I_N -> 'M[R]_(r, k)).

(* P7: sum_i p_i B_i A_i - B_bar A_bar = sum_i p_i (B_i - B_bar)(A_i - A_bar) when
   sum_i p_i = 1, with B_bar = sum_i p_i B_i and A_bar = sum_i p_i A_i. *)
Theorem P7_fedit_error_identity :
  \sum_(i < N) p i = 1 ->
  mean_update p B A - fedit p B A =
  \sum_(i < N) p i *: ((B i - factor_mean p B) *m (A i - factor_mean p A)).
Proof.
move=> hp; rewrite /fedit.
set Bb := factor_mean p B; set Ab := factor_mean p A.
have e1 : \sum_(i < N) p i *: (B i *m Ab) = Bb *m Ab by rewrite wsum_mulr.
have e2 : \sum_(i < N) p i *: (Bb *m A i) = Bb *m Ab by rewrite wsum_mull.
have e3 : \sum_(i < N) p i *: (Bb *m Ab) = Bb *m Ab by rewrite -scaler_suml hp scale1r.
rewrite (eq_bigr (fun i => (p i *: (B i *m A i) - p i *: (B i *m Ab))
                           - (p i *: (Bb *m A i) - p i *: (Bb *m Ab)))); last first.
  by move=> i _; rewrite mulmxBl !mulmxBr !scalerBr.
by rewrite !sumrB e1 e2 e3 subrr subr0.
Qed.

End P7.

Section Witness.
Variable R : numFieldType.

Let half : R := 2^-1.

Let half_half : half + half = 1.
Proof. by rewrite /half -mulr2n -mulr_natr mulVf // pnatr_eq0. Qed.

Let G (i : 'I_2) : 'M[R]_1 := if val i == 0%N then 1%:M else - 1%:M.

Let G_orth i : (G i)^T *m G i = 1%:M.
Proof.
rewrite /G; case: ifP => _; first by rewrite trmx1 mulmx1.
by rewrite trmxN trmx1 mulmxN mulNmx opprK mulmx1.
Qed.

Let G_orth' i : G i *m (G i)^T = 1%:M.
Proof. exact: mulmx1C (G_orth i). Qed.

(* FedIT is not gauge invariant: two clients with weights 1/2, 1 x 1 factors, and the
   orthogonal gauge G = 1 on client 1, G = -1 on client 2 keep every client's product but move
   FedIT's product B_bar A_bar (from 1 to 0). *)
Theorem P7_fedit_not_gauge_invariant :
  exists (p : 'I_2 -> R) (B : 'I_2 -> 'M[R]_(1, 1)) (A : 'I_2 -> 'M[R]_(1, 1))
         (G : 'I_2 -> 'M[R]_1),
    [/\ \sum_(i < 2) p i = 1, forall i, 0 <= p i,
        forall i, (G i)^T *m G i = 1%:M,
        forall i, (B i *m G i) *m ((G i)^T *m A i) = B i *m A i &
        fedit p (fun i => B i *m G i) (fun i => (G i)^T *m A i) != fedit p B A].
Proof.
exists (fun _ => half), (fun _ => 1%:M), (fun _ => 1%:M), G; split.
- by rewrite big_ord_recl big_ord1.
- by move=> i; rewrite /half invr_ge0 ler0n.
- exact: G_orth.
- by move=> i; rewrite -mulmxA (mulmxA (G i)) G_orth' mul1mx.
rewrite /fedit /factor_mean !big_ord_recl !big_ord0 !addr0 /G /= !mul1mx.
rewrite -scalerDl half_half scale1r mul1mx scalerN subrr mul0mx.
apply/eqP => /matrixP /(_ 0 0); rewrite !mxE /= => /eqP.
by rewrite eq_sym oner_eq0.
Qed.

End Witness.
