(* GLoRA.AutoRank: P13 (the certified residual along nested server bases is non-increasing and
   vanishes once the basis spans the clients' union, so the auto-rank rule's smallest certified
   rank exists and is at most that dimension) and P14 (side="auto" keeps the better side). *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core Projection Certificate TopEig.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory Order.Theory.
Local Open Scope ring_scope.

Section P13.
Variable R : realFieldType.

(* Nested orthonormal bases (col(U1) inside col(U2), e.g. the first R1 and R2 columns of one
   sorted eigenbasis): the larger one leaves no larger residual. *)
Theorem P13_residual_nonincreasing d k r1 r2 (U1 : 'M[R]_(d, r1)) (U2 : 'M[R]_(d, r2))
    (W : 'M[R]_(d, k)) :
  U1^T *m U1 = 1%:M -> U2^T *m U2 = 1%:M -> (U1^T <= U2^T)%MS ->
  fro2 (W - U2 *m U2^T *m W) <= fro2 (W - U1 *m U1^T *m W).
Proof.
move=> h1 h2 hsub; rewrite !P12_certificate_left // !P12_kept_left // ler_add2l ler_opp2.
have e : U1^T *m (U2 *m U2^T) = U1^T.
  by rewrite -(proj_sym U2) -trmx_mul proj_fix.
have -> : U1^T *m W = U1^T *m (U2 *m U2^T *m W) by rewrite !mulmxA -(mulmxA U1^T) e.
apply: le_trans (P12_kept_le_total _ h1) _.
by rewrite P12_kept_left.
Qed.

Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref : 'M[R]_(d, rk)) (lam : 'rV[R]_rk).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

(* ... and it is 0 once R >= dim sum_i col(U_i) (P2): the smallest R whose certified residual is
   within any tolerance exists and is at most that dimension. *)
Theorem P13_residual_zero_at_union :
  (forall j, 0 <= p j) -> top_eig (consensus p U) Uref lam ->
  (\rank (\sum_i <<(U i)^T>>)%MS <= rk)%N -> (forall i, U i *m C i = B i *m A i) ->
  fro2 (mean_update p B A - Uref *m coords p Uref U C) = 0.
Proof.
move=> hp ht hrk hUC; rewrite (P2_exact_top_eig hp ht hrk hUC) subrr.
by rewrite /fro2 trmx0 mul0mx linear0.
Qed.

End P13.

Section P14.
Variable R : realFieldType.
Variables (d k rl rr : nat) (W : 'M[R]_(d, k)) (U : 'M[R]_(d, rl)) (V : 'M[R]_(k, rr)).

(* side="auto": the left update U U^T W or the right one W V V^T, whichever leaves the smaller
   residual (the left on a tie). *)
Definition auto_update : 'M[R]_(d, k) :=
  if fro2 (W - U *m U^T *m W) <= fro2 (W - W *m V *m V^T) then U *m U^T *m W
  else W *m V *m V^T.

Theorem P14_auto_side_is_the_better_side :
  fro2 (W - auto_update) <= fro2 (W - U *m U^T *m W) /\
  fro2 (W - auto_update) <= fro2 (W - W *m V *m V^T).
Proof.
rewrite /auto_update; case: ifP => h; first by split.
by move/negbT: h; rewrite -ltNge => /ltW h; split.
Qed.

End P14.
