(* GLoRA.Projection: P1 (projection of the mean), P2 (exactness) and P11 (right side). *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

(* ------------------------------------------------------------------------------------ P1 *)

Section P1.
Variable R : comRingType.
Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref : 'M[R]_(d, rk)) (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

(* S = U_ref^T W_bar whenever every client's gauge-fixed pair reproduces its product. *)
Theorem P1_coords_are_projected_mean :
  (forall i, U i *m C i = B i *m A i) -> coords p Uref U C = Uref^T *m mean_update p B A.
Proof. exact: coords_mean. Qed.

(* P1: U_ref S = U_ref U_ref^T W_bar (no hypothesis on U_ref; with U_ref^T U_ref = 1 the right
   side is the orthogonal projection of W_bar onto col(U_ref)). *)
Theorem P1_projection_of_the_mean :
  (forall i, U i *m C i = B i *m A i) ->
  Uref *m coords p Uref U C = Uref *m Uref^T *m mean_update p B A.
Proof. by move=> h; rewrite (coords_mean _ _ h) mulmxA. Qed.

End P1.

(* ------------------------------------------------------------------------------------ P2 *)

Section P2.
Variable R : fieldType.
Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref : 'M[R]_(d, rk)) (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

(* P2, general form: if col(B_i A_i) is inside col(U_ref) for every client of nonzero weight
   and U_ref^T U_ref = 1, the server update is the mean update. *)
Theorem P2_exactness :
  Uref^T *m Uref = 1%:M ->
  (forall i, p i != 0 -> ((B i *m A i)^T <= Uref^T)%MS) ->
  (forall i, U i *m C i = B i *m A i) ->
  Uref *m coords p Uref U C = mean_update p B A.
Proof.
move=> hU hsub hUC; rewrite (P1_projection_of_the_mean _ _ hUC) /mean_update -wsum_mull.
apply: eq_bigr => i _; have [->|hi] := eqVneq (p i) 0; first by rewrite !scale0r.
by rewrite proj_fix ?hsub.
Qed.

(* P2 with the hypothesis on the factors: col(B_i) inside col(U_ref). *)
Theorem P2_exact_if_factor_columns_in :
  Uref^T *m Uref = 1%:M ->
  (forall i, p i != 0 -> ((B i)^T <= Uref^T)%MS) ->
  (forall i, U i *m C i = B i *m A i) ->
  Uref *m coords p Uref U C = mean_update p B A.
Proof.
move=> hU hsub hUC; apply: P2_exactness => // i hi.
by rewrite trmx_mul (submx_trans (submxMl _ _)) ?hsub.
Qed.

(* P2 as in the brief: every client basis is U_i = U_ref X_i (col(U_i) inside col(U_ref)). *)
Theorem P2_exact_if_client_bases_in (X : forall i, 'M[R]_(rk, u i)) :
  Uref^T *m Uref = 1%:M ->
  (forall i, p i != 0 -> U i = Uref *m X i) ->
  (forall i, U i *m C i = B i *m A i) ->
  Uref *m coords p Uref U C = mean_update p B A.
Proof.
move=> hU hX hUC; apply: P2_exactness => // i hi.
by rewrite -hUC (hX i hi) -mulmxA trmx_mul submxMl.
Qed.

End P2.

(* Special case of P2: a single client is reproduced by its own orthonormal basis. *)
Theorem P2_single_client (R : fieldType) d k u r (U0 : 'M[R]_(d, u)) (C0 : 'M[R]_(u, k))
    (B0 : 'M[R]_(d, r)) (A0 : 'M[R]_(r, k)) :
  U0^T *m U0 = 1%:M -> U0 *m C0 = B0 *m A0 ->
  U0 *m coords (fun _ : 'I_1 => 1) U0 (fun _ => U0) (fun _ => C0) = B0 *m A0.
Proof.
move=> hU hUC.
have -> : B0 *m A0 = mean_update (fun _ : 'I_1 => 1) (fun _ => B0) (fun _ => A0).
  by rewrite /mean_update big_ord1 scale1r.
apply: (@P2_exact_if_client_bases_in _ _ _ _ _ (fun _ => u) (fun _ => r) _ _ _ _ _ _
          (fun _ => 1%:M)) => // i _.
by rewrite mulmx1.
Qed.

(* ------------------------------------------------ the range of K (towards the paper's P2) *)

Section ConsensusRange.
Variable R : realFieldType.
Variables (N d : nat) (u : 'I_N -> nat) (p : 'I_N -> R) (U : forall i, 'M[R]_(d, u i)).

Lemma consensus_sym : (consensus p U)^T = consensus p U.
Proof. by rewrite /consensus trmx_wsum; apply: eq_bigr => i _; rewrite proj_sym. Qed.

(* With nonnegative weights, X K = 0 forces X U_i = 0 for every client of nonzero weight. *)
Lemma consensus_kernel m (X : 'M[R]_(m, d)) :
  (forall j, 0 <= p j) -> X *m consensus p U = 0 -> forall i, p i != 0 -> X *m U i = 0.
Proof.
move=> hp hX i hi.
have e : \sum_j p j * fro2 (X *m U j) = 0.
  transitivity (\tr (X *m consensus p U *m X^T)); last by rewrite hX mul0mx linear0.
  rewrite /consensus mulmx_sumr mulmx_suml raddf_sum; apply: eq_bigr => j _ /=.
  rewrite -scalemxAr -scalemxAl mxtraceZ; congr (_ * _).
  have -> : X *m (U j *m (U j)^T) *m X^T = (X *m U j) *m (X *m U j)^T.
    by rewrite trmx_mul !mulmxA.
  by rewrite mxtrace_mulC.
have := psumr_eq0P (fun j _ => mulr_ge0 (hp j) (fro2_ge0 (X *m U j))) e; move/(_ i isT).
by move/eqP; rewrite mulf_eq0 (negbTE hi) /= => /eqP /fro2_eq0.
Qed.

(* With nonnegative weights, every client of nonzero weight has col(U_i) inside
   col(K) = row(K): the consensus matrix sees every participating client subspace. *)
Theorem consensus_contains_clients i :
  (forall j, 0 <= p j) -> p i != 0 -> ((U i)^T <= consensus p U)%MS.
Proof.
move=> hp hi.
have hker : kermx (consensus p U) *m U i = 0.
  exact: consensus_kernel hp (mulmx_ker _) i hi.
have e1 : (kermx (consensus p U) == kermx (row_mx (consensus p U) (U i)))%MS.
  apply/andP; split; apply/sub_kermxP.
    by rewrite mul_mx_row mulmx_ker hker row_mx0.
  by have /eqP := mulmx_ker (row_mx (consensus p U) (U i));
     rewrite mul_mx_row row_mx_eq0 => /andP[/eqP -> _].
have erank : \rank (row_mx (consensus p U) (U i)) = \rank (consensus p U).
  have := eqmx_rank e1; rewrite !mxrank_ker => h.
  by rewrite -(subKn (rank_leq_row (row_mx (consensus p U) (U i)))) -h subKn // rank_leq_row.
have ecol : \rank (col_mx (consensus p U) (U i)^T) = \rank (consensus p U).
  by rewrite -mxrank_tr tr_col_mx consensus_sym trmxK erank.
have [_ eq] := mxrank_leqif_sup (addsmxSl (consensus p U) (U i)^T).
have : (consensus p U + (U i)^T <= consensus p U)%MS.
  by rewrite -eq; move/eqmxP/eqmx_rank: (addsmxE (consensus p U) (U i)^T) => ->; rewrite ecol.
by rewrite addsmx_sub => /andP[].
Qed.

End ConsensusRange.

Section P2Consensus.
Variable R : realFieldType.
Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref : 'M[R]_(d, rk)) (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

(* P2 from the consensus matrix: with nonnegative weights, if col(U_ref) contains the range of
   K = sum_i p_i U_i U_i^T (what the top-R eigenvectors of K do when R >= rank K), the server
   update is exact. *)
Theorem P2_exact_if_consensus_range_in :
  (forall j, 0 <= p j) ->
  Uref^T *m Uref = 1%:M ->
  (consensus p U <= Uref^T)%MS ->
  (forall i, U i *m C i = B i *m A i) ->
  Uref *m coords p Uref U C = mean_update p B A.
Proof.
move=> hp hU hK hUC; apply: P2_exactness => // i hi.
rewrite -hUC trmx_mul (submx_trans (submxMl _ _)) //.
exact: submx_trans (consensus_contains_clients U hp hi) hK.
Qed.

End P2Consensus.

(* ----------------------------------------------------------------------------------- P11 *)

Section P11.
Variable R : comRingType.
Variables (N d k rk : nat) (r : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (Vref : 'M[R]_(k, rk)).

(* S' = W_bar V_ref. *)
Theorem P11_right_coords_are_projected_mean : right_coords p B A Vref = mean_update p B A *m Vref.
Proof. exact: right_coords_mean. Qed.

(* P11: S' V_ref^T = W_bar V_ref V_ref^T. *)
Theorem P11_right_projection_of_the_mean :
  right_coords p B A Vref *m Vref^T = mean_update p B A *m Vref *m Vref^T.
Proof. by rewrite right_coords_mean. Qed.

End P11.

Section P11Exact.
Variable R : fieldType.
Variables (N d k rk : nat) (r : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (Vref : 'M[R]_(k, rk)).

(* P11 exactness, general form: row(B_i A_i) inside col(V_ref) for clients of nonzero weight. *)
Theorem P11_right_exactness :
  Vref^T *m Vref = 1%:M ->
  (forall i, p i != 0 -> (B i *m A i <= Vref^T)%MS) ->
  right_coords p B A Vref *m Vref^T = mean_update p B A.
Proof.
move=> hV hsub; rewrite P11_right_projection_of_the_mean /mean_update -!wsum_mulr.
apply: eq_bigr => i _; have [->|hi] := eqVneq (p i) 0; first by rewrite !scale0r.
by rewrite proj_fix_right ?hsub.
Qed.

(* P11 exactness with the hypothesis on the factors: row(A_i) inside col(V_ref). *)
Theorem P11_exact_if_factor_rows_in :
  Vref^T *m Vref = 1%:M ->
  (forall i, p i != 0 -> (A i <= Vref^T)%MS) ->
  right_coords p B A Vref *m Vref^T = mean_update p B A.
Proof.
move=> hV hsub; apply: P11_right_exactness => // i hi.
by rewrite (submx_trans (submxMl _ _)) ?hsub.
Qed.

End P11Exact.

Section P11Consensus.
Variable R : realFieldType.
Variables (N d k rk : nat) (r v : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (Vref : 'M[R]_(k, rk)).
Variable V : forall i, 'M[R]_(k, v i).

(* P11 from the right consensus K_R = sum_i p_i V_i V_i^T, with row(A_i) inside col(V_i)
   (V_i a basis of row(A_i)): if col(V_ref) contains the range of K_R, S' V_ref^T = W_bar. *)
Theorem P11_exact_if_right_consensus_range_in :
  (forall j, 0 <= p j) ->
  Vref^T *m Vref = 1%:M ->
  (forall i, (A i <= (V i)^T)%MS) ->
  (consensus p V <= Vref^T)%MS ->
  right_coords p B A Vref *m Vref^T = mean_update p B A.
Proof.
move=> hp hV hA hK; apply: P11_exact_if_factor_rows_in => // i hi.
exact: submx_trans (hA i) (submx_trans (consensus_contains_clients V hp hi) hK).
Qed.

End P11Consensus.
