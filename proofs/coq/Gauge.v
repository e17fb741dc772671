(* GLoRA.Gauge: P3 (gauge invariance, the paper's Proposition 2) and its right-side twin (P11).

   A gauge change of client i is (B_i, A_i) -> (B_i G_i, G_i^-1 A_i) with G_i invertible
   (G_i \in unitmx; orthogonal gauges are a special case). What is proved: the product, the
   column space of B_i, every orthonormal basis' projector, K, W_bar and U_ref S do not move.
   What is NOT proved here: that the top-R eigenvectors of K span a subspace that is a function
   of K (true when the eigengap is positive; spectral theory, not machine-checked). The update
   theorem therefore takes two orthonormal bases U_ref, U_ref' of the same column space. *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core Projection.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

Section Projectors.
Variable R : fieldType.

(* The brief's form: U' = U Q with U, U' orthonormal (Q square) gives U' U'^T = U U^T. *)
Theorem P3_projector_basis_change d r (U U' : 'M[R]_(d, r)) (Q : 'M[R]_r) :
  U^T *m U = 1%:M -> U'^T *m U' = 1%:M -> U' = U *m Q -> U' *m U'^T = U *m U^T.
Proof. exact: proj_basis_change. Qed.

(* General form: orthonormal bases of the same column space (of possibly different widths)
   have the same projector. *)
Theorem P3_projector_of_column_space d r1 r2 (U : 'M[R]_(d, r1)) (V : 'M[R]_(d, r2)) :
  U^T *m U = 1%:M -> V^T *m V = 1%:M -> (U^T == V^T)%MS -> U *m U^T = V *m V^T.
Proof. exact: proj_colspace. Qed.

(* "qr" gauge fixing: B = Q T with T invertible (B of full column rank) gives col(Q) = col(B). *)
Theorem P3_qr_basis_spans d r (B Q : 'M[R]_(d, r)) (T : 'M[R]_r) :
  T \in unitmx -> B = Q *m T -> (Q^T == B^T)%MS.
Proof.
by move=> uT ->; apply: eqmxb_sym; apply: colspace_mul_unit.
Qed.

(* A gauge does not change the column space of B: col(B G) = col(B). *)
Theorem P3_gauge_keeps_column_space d r (B : 'M[R]_(d, r)) (G : 'M[R]_r) :
  G \in unitmx -> ((B *m G)^T == B^T)%MS.
Proof. exact: colspace_mul_unit. Qed.

(* A gauge does not change the product: (B G)(G^-1 A) = B A. *)
Theorem P3_gauge_keeps_product d r k (B : 'M[R]_(d, r)) (A : 'M[R]_(r, k)) (G : 'M[R]_r) :
  G \in unitmx -> (B *m G) *m (invmx G *m A) = B *m A.
Proof. by move=> uG; rewrite -mulmxA mulKVmx. Qed.

(* One client: an orthonormal basis U of col(B) and an orthonormal basis U' of col(B G) have
   the same projector, whatever the bases ("qr" mode). *)
Theorem P3_client_projector_gauge_invariant d r r1 r2 (B : 'M[R]_(d, r)) (G : 'M[R]_r)
    (U : 'M[R]_(d, r1)) (U' : 'M[R]_(d, r2)) :
  G \in unitmx -> U^T *m U = 1%:M -> U'^T *m U' = 1%:M ->
  (U^T == B^T)%MS -> (U'^T == (B *m G)^T)%MS -> U *m U^T = U' *m U'^T.
Proof.
move=> uG hU hU' eU eU'; apply: proj_colspace => //.
by apply: eqmxb_trans eU (eqmxb_sym (eqmxb_trans eU' (colspace_mul_unit B uG))).
Qed.

End Projectors.

Section Clients.
Variable R : fieldType.
Variables (N d k : nat) (r u u' : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (G : forall i, 'M[R]_(r i)).
Variables (U : forall i, 'M[R]_(d, u i)) (U' : forall i, 'M[R]_(d, u' i)).

(* K only depends on the client column spaces. *)
Theorem P3_consensus_of_column_spaces :
  (forall i, (U i)^T *m U i = 1%:M) -> (forall i, (U' i)^T *m U' i = 1%:M) ->
  (forall i, ((U i)^T == (U' i)^T)%MS) -> consensus p U = consensus p U'.
Proof.
move=> hU hU' e; rewrite /consensus; apply: eq_bigr => i _.
by rewrite (proj_colspace (hU i) (hU' i) (e i)).
Qed.

(* W_bar is unchanged by per-client gauges. *)
Theorem P3_mean_gauge_invariant :
  (forall i, G i \in unitmx) ->
  mean_update p (fun i => B i *m G i) (fun i => invmx (G i) *m A i) = mean_update p B A.
Proof.
move=> uG; rewrite /mean_update; apply: eq_bigr => i _.
by rewrite P3_gauge_keeps_product.
Qed.

(* K is unchanged by per-client gauges, "qr" mode: U_i spans col(B_i), U'_i spans col(B_i G_i). *)
Theorem P3_consensus_gauge_invariant :
  (forall i, G i \in unitmx) ->
  (forall i, (U i)^T *m U i = 1%:M) -> (forall i, (U' i)^T *m U' i = 1%:M) ->
  (forall i, ((U i)^T == (B i)^T)%MS) -> (forall i, ((U' i)^T == (B i *m G i)^T)%MS) ->
  consensus p U = consensus p U'.
Proof.
move=> uG hU hU' eU eU'; apply: P3_consensus_of_column_spaces => // i.
by apply: eqmxb_trans (eU i) (eqmxb_sym (eqmxb_trans (eU' i) (colspace_mul_unit _ (uG i)))).
Qed.

(* K is unchanged by per-client gauges, "svd" mode: U_i spans col(B_i A_i) and U'_i spans
   col((B_i G_i)(G_i^-1 A_i)). *)
Theorem P3_consensus_gauge_invariant_svd :
  (forall i, G i \in unitmx) ->
  (forall i, (U i)^T *m U i = 1%:M) -> (forall i, (U' i)^T *m U' i = 1%:M) ->
  (forall i, ((U i)^T == (B i *m A i)^T)%MS) ->
  (forall i, ((U' i)^T == ((B i *m G i) *m (invmx (G i) *m A i))^T)%MS) ->
  consensus p U = consensus p U'.
Proof.
move=> uG hU hU' eU eU'; apply: P3_consensus_of_column_spaces => // i.
apply: eqmxb_trans (eU i) (eqmxb_sym _).
by rewrite -(P3_gauge_keeps_product (B i) (A i) (uG i)); apply: eU'.
Qed.

(* P5, the part about K: scaling client i's update by c_i != 0 (B_i -> c_i B_i; in the
   paper's setting c_i > 0) does not change col(B_i), hence not K. That U_ref, the top-R
   eigenvectors of K, is then unchanged is spectral and not machine-checked. *)
Theorem P5_consensus_scale_invariant (c : 'I_N -> R) :
  (forall i, c i != 0) ->
  (forall i, (U i)^T *m U i = 1%:M) -> (forall i, (U' i)^T *m U' i = 1%:M) ->
  (forall i, ((U i)^T == (B i)^T)%MS) -> (forall i, ((U' i)^T == (c i *: B i)^T)%MS) ->
  consensus p U = consensus p U'.
Proof.
move=> hc hU hU' eU eU'; apply: P3_consensus_of_column_spaces => // i.
apply: eqmxb_trans (eU i) (eqmxb_sym (eqmxb_trans (eU' i) _)).
by rewrite trmxZ; apply/eqmxP; apply: eqmx_scale.
Qed.

End Clients.

Section Update.
Variable R : fieldType.
Variables (N d k rk rk' : nat) (r u u' : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (G : forall i, 'M[R]_(r i)).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (U' : forall i, 'M[R]_(d, u' i)) (C' : forall i, 'M[R]_(u' i, k)).
Variables (Uref : 'M[R]_(d, rk)) (Uref' : 'M[R]_(d, rk')).

(* U_ref S is unchanged by per-client gauges and by the choice of orthonormal basis of the
   server subspace: (U_i, C_i) gauge-fixes (B_i, A_i), (U'_i, C'_i) gauge-fixes
   (B_i G_i, G_i^-1 A_i), and U_ref, U_ref' are orthonormal bases of the same subspace. *)
Theorem P3_update_gauge_invariant :
  (forall i, G i \in unitmx) ->
  Uref^T *m Uref = 1%:M -> Uref'^T *m Uref' = 1%:M -> (Uref^T == Uref'^T)%MS ->
  (forall i, U i *m C i = B i *m A i) ->
  (forall i, U' i *m C' i = (B i *m G i) *m (invmx (G i) *m A i)) ->
  Uref' *m coords p Uref' U' C' = Uref *m coords p Uref U C.
Proof.
move=> uG hU hU' e hUC hUC'.
rewrite (P1_projection_of_the_mean _ _ hUC) (P1_projection_of_the_mean _ _ hUC').
by rewrite P3_mean_gauge_invariant // (proj_colspace hU hU' e).
Qed.

End Update.

(* ------------------------------------------------------------------- right side (P11) *)

Section Right.
Variable R : fieldType.

(* A gauge does not change the row space of A: row(G^-1 A) = row(A). *)
Theorem P11_gauge_keeps_row_space r k (A : 'M[R]_(r, k)) (G : 'M[R]_r) :
  G \in unitmx -> (invmx G *m A == A)%MS.
Proof.
by move=> uG; apply/eqmxP; apply: eqmxMfull; rewrite row_full_unit unitmx_inv.
Qed.

(* One client: an orthonormal basis V of row(A) (col(V) = row(A)) and one of row(G^-1 A) give
   the same projector V V^T. *)
Theorem P11_client_projector_gauge_invariant r k v1 v2 (A : 'M[R]_(r, k)) (G : 'M[R]_r)
    (V : 'M[R]_(k, v1)) (V' : 'M[R]_(k, v2)) :
  G \in unitmx -> V^T *m V = 1%:M -> V'^T *m V' = 1%:M ->
  (V^T == A)%MS -> (V'^T == invmx G *m A)%MS -> V *m V^T = V' *m V'^T.
Proof.
move=> uG hV hV' eV eV'; apply: proj_colspace => //.
by apply: eqmxb_trans eV (eqmxb_sym (eqmxb_trans eV' (P11_gauge_keeps_row_space A uG))).
Qed.

Variables (N d k rk rk' : nat) (r v v' : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (G : forall i, 'M[R]_(r i)).
Variables (V : forall i, 'M[R]_(k, v i)) (V' : forall i, 'M[R]_(k, v' i)).

(* K_R = sum_i p_i V_i V_i^T is unchanged by per-client gauges. *)
Theorem P11_right_consensus_gauge_invariant :
  (forall i, G i \in unitmx) ->
  (forall i, (V i)^T *m V i = 1%:M) -> (forall i, (V' i)^T *m V' i = 1%:M) ->
  (forall i, ((V i)^T == A i)%MS) -> (forall i, ((V' i)^T == invmx (G i) *m A i)%MS) ->
  consensus p V = consensus p V'.
Proof.
move=> uG hV hV' eV eV'; rewrite /consensus; apply: eq_bigr => i _.
by rewrite (P11_client_projector_gauge_invariant (uG i) (hV i) (hV' i) (eV i) (eV' i)).
Qed.

Variables (Vref : 'M[R]_(k, rk)) (Vref' : 'M[R]_(k, rk')).

(* S' V_ref^T is unchanged by per-client gauges and by the choice of orthonormal basis of the
   server's right subspace. *)
Theorem P11_right_update_gauge_invariant :
  (forall i, G i \in unitmx) ->
  Vref^T *m Vref = 1%:M -> Vref'^T *m Vref' = 1%:M -> (Vref^T == Vref'^T)%MS ->
  right_coords p (fun i => B i *m G i) (fun i => invmx (G i) *m A i) Vref' *m Vref'^T =
  right_coords p B A Vref *m Vref^T.
Proof.
move=> uG hV hV' e; rewrite !P11_right_projection_of_the_mean.
by rewrite P3_mean_gauge_invariant // -!mulmxA (proj_colspace hV hV' e).
Qed.

End Right.
