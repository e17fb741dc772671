(* GLoRA.Permutation: P6, client-permutation invariance and zero-weight dropout.

   Every server quantity is a weighted sum over clients (W_bar, K, S, S', FedIT's B_bar and
   A_bar); the two generic lemmas below are instantiated for each of them. A permutation s of
   the clients relabels weights, factors and (possibly different) ranks together. *)

From mathcomp Require Import all_ssreflect all_algebra fingroup perm.
From GLoRA Require Import Core.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

Section Generic.
Variable R : ringType.

(* Reindexing a weighted sum by a permutation of the clients. *)
Theorem P6_weighted_sum_permutation N m n (s : {perm 'I_N}) (p : 'I_N -> R) (F : 'I_N -> 'M[R]_(m, n)) :
  \sum_(i < N) p (s i) *: F (s i) = \sum_(i < N) p i *: F i.
Proof. by rewrite [RHS](reindex_inj (@perm_inj _ s)). Qed.

(* A client j of zero weight drops out: the sum over N.+1 clients equals the sum over the N
   others (lift j enumerates the indices other than j). *)
Theorem P6_weighted_sum_zero_weight N m n (j : 'I_N.+1) (p : 'I_N.+1 -> R)
    (F : 'I_N.+1 -> 'M[R]_(m, n)) :
  p j = 0 -> \sum_(i < N.+1) p i *: F i = \sum_(i < N) p (lift j i) *: F (lift j i).
Proof.
by move=> hj; rewrite (bigD1_ord j) //= hj scale0r add0r.
Qed.

(* ... and so does its weight from the total used to renormalise. *)
Theorem P6_total_weight_zero_weight N (j : 'I_N.+1) (p : 'I_N.+1 -> R) :
  p j = 0 -> \sum_(i < N.+1) p i = \sum_(i < N) p (lift j i).
Proof. by move=> hj; rewrite (bigD1_ord j) //= hj add0r. Qed.

End Generic.

Section Instances.
Variable R : comRingType.
Variables (N d k rk : nat) (r u : 'I_N -> nat) (s : {perm 'I_N}) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (Uref : 'M[R]_(d, rk)) (Vref : 'M[R]_(k, rk)).

Theorem P6_mean_permutation :
  mean_update (fun i => p (s i)) (fun i => B (s i)) (fun i => A (s i)) = mean_update p B A.
Proof. exact: (P6_weighted_sum_permutation s p (fun i => B i *m A i)). Qed.

Theorem P6_consensus_permutation :
  consensus (fun i => p (s i)) (fun i => U (s i)) = consensus p U.
Proof. exact: (P6_weighted_sum_permutation s p (fun i => U i *m (U i)^T)). Qed.

Theorem P6_coords_permutation :
  coords (fun i => p (s i)) Uref (fun i => U (s i)) (fun i => C (s i)) = coords p Uref U C.
Proof. exact: (P6_weighted_sum_permutation s p (fun i => Uref^T *m U i *m C i)). Qed.

(* Hence the server update U_ref S (for a given U_ref; U_ref is a function of K, which is
   permutation invariant). *)
Theorem P6_update_permutation :
  Uref *m coords (fun i => p (s i)) Uref (fun i => U (s i)) (fun i => C (s i)) =
  Uref *m coords p Uref U C.
Proof. by rewrite P6_coords_permutation. Qed.

Theorem P6_right_coords_permutation :
  right_coords (fun i => p (s i)) (fun i => B (s i)) (fun i => A (s i)) Vref =
  right_coords p B A Vref.
Proof. exact: (P6_weighted_sum_permutation s p (fun i => B i *m (A i *m Vref))). Qed.

End Instances.

Section FedITInstances.
Variable R : comRingType.
Variables (N d k r : nat) (s : {perm 'I_N}) (p : 'I_N -> R).
Variables (B : 'I_N -> 'M[R]_(d, r)) (A : 'I_N -> 'M[R]_(r, k)).

Theorem P6_fedit_permutation :
  fedit (fun i => p (s i)) (fun i => B (s i)) (fun i => A (s i)) = fedit p B A.
Proof.
by rewrite /fedit /factor_mean !(P6_weighted_sum_permutation s p).
Qed.

End FedITInstances.

Section ZeroWeightInstances.
Variable R : comRingType.
Variables (N d k rk : nat) (r u : 'I_N.+1 -> nat) (j : 'I_N.+1) (p : 'I_N.+1 -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (Uref : 'M[R]_(d, rk)) (Vref : 'M[R]_(k, rk)).

Theorem P6_mean_zero_weight :
  p j = 0 ->
  mean_update p B A = mean_update (fun i => p (lift j i)) (fun i => B (lift j i))
                                  (fun i => A (lift j i)).
Proof. by move=> hj; rewrite /mean_update (@P6_weighted_sum_zero_weight _ _ _ _ j p (fun i => B i *m A i) hj). Qed.

Theorem P6_consensus_zero_weight :
  p j = 0 -> consensus p U = consensus (fun i => p (lift j i)) (fun i => U (lift j i)).
Proof. by move=> hj; rewrite /consensus (@P6_weighted_sum_zero_weight _ _ _ _ j p (fun i => U i *m (U i)^T) hj). Qed.

Theorem P6_coords_zero_weight :
  p j = 0 ->
  coords p Uref U C = coords (fun i => p (lift j i)) Uref (fun i => U (lift j i))
                             (fun i => C (lift j i)).
Proof. by move=> hj; rewrite /coords (@P6_weighted_sum_zero_weight _ _ _ _ j p (fun i => Uref^T *m U i *m C i) hj). Qed.

Theorem P6_right_coords_zero_weight :
  p j = 0 ->
  right_coords p B A Vref = right_coords (fun i => p (lift j i)) (fun i => B (lift j i))
                                         (fun i => A (lift j i)) Vref.
Proof. by move=> hj; rewrite /right_coords (@P6_weighted_sum_zero_weight _ _ _ _ j p (fun i => B i *m (A i *m Vref)) hj). Qed.

End ZeroWeightInstances.
