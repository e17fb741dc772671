(* GLoRA.Unique: P3's spectral step. With a positive eigengap (every nonzero direction orthogonal
   to col(U) has a Rayleigh quotient strictly below every kept eigenvalue), TopEig_R(K) spans a
   subspace fixed by K: any other TopEig_R(K) spans the same one. Hence P3 and P11's gauge
   invariance hold for U_ref = TopEig_R(K) itself, not only for two bases of one subspace. The
   proof needs no spectral theorem: the parts of each basis orthogonal to the other basis are
   eigenvectors; one nonzero on each side would give an eigenvalue strictly below and one at or
   above the same eigenvalue. *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core Projection Gauge TopEig.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory Order.Theory.
Local Open Scope ring_scope.

Section Unique.
Variable R : realFieldType.
Variables (n rk : nat) (K : 'M[R]_n).

(* A positive eigengap: every nonzero direction orthogonal to col(U) has a Rayleigh quotient
   strictly below every kept eigenvalue. *)
Definition eigengap (U : 'M[R]_(n, rk)) (lam : 'rV[R]_rk) : Prop :=
  forall (x : 'rV[R]_n) (j : 'I_rk),
    x != 0 -> x *m U = 0 -> \tr (x *m K *m x^T) < lam 0 j * \tr (x *m x^T).

Lemma nonzero_row m (M : 'M[R]_(m, n)) : M != 0 -> exists j, row j M != 0.
Proof.
move=> M0; have [j hj|h] := pickP (fun j => row j M != 0); first by exists j.
by case/eqP: M0; apply/row_matrixP => j; rewrite row0; apply/eqP; move/negbFE: (h j).
Qed.

Lemma row_diag_mul m (l : 'rV[R]_m) (A : 'M[R]_(m, n)) j :
  row j (diag_mx l *m A) = l 0 j *: row j A.
Proof. by apply/rowP => t; rewrite mul_diag_mx !mxE. Qed.

(* The rows of (1 - U U^T)-projected eigenvectors: if K U' = U' diag(lam') then every row x
   of U'^T (1 - U U^T) satisfies x K = lam'_j x, when U is K-invariant (K U = U diag(lam)). *)
Lemma projected_eigen (U U' : 'M[R]_(n, rk)) (lam lam' : 'rV[R]_rk) j :
  K^T = K -> K *m U = U *m diag_mx lam -> K *m U' = U' *m diag_mx lam' ->
  let x := row j (U'^T *m (1%:M - U *m U^T)) in x *m K = lam' 0 j *: x.
Proof.
move=> hK hKU hKU' x.
have hPK : (1%:M - U *m U^T) *m K = K *m (1%:M - U *m U^T).
  rewrite mulmxBl mulmxBr mul1mx mulmx1 -mulmxA.
  have -> : U^T *m K = diag_mx lam *m U^T by rewrite -{1}hK -trmx_mul hKU trmx_mul tr_diag_mx.
  by rewrite mulmxA -hKU mulmxA.
have hU'K : U'^T *m K = diag_mx lam' *m U'^T.
  by rewrite -{1}hK -trmx_mul hKU' trmx_mul tr_diag_mx.
by rewrite /x -row_mul -mulmxA hPK mulmxA hU'K -mulmxA row_diag_mul.
Qed.

Lemma same_span_of (X Y : 'M[R]_(n, rk)) :
  X^T *m X = 1%:M -> Y^T *m Y = 1%:M -> Y^T *m (1%:M - X *m X^T) = 0 -> (Y^T == X^T)%MS.
Proof.
move=> hX hY e.
have hsub : (Y^T <= X^T)%MS.
  have -> : Y^T = Y^T *m X *m X^T.
    by apply/eqP; rewrite -subr_eq0 -mulmxA -{1}[Y^T]mulmx1 -mulmxBr e.
  exact: submxMl.
apply/andP; split => //; have [_ eq] := mxrank_leqif_sup hsub.
by rewrite -eq (orthonormal_rank hX) (orthonormal_rank hY).
Qed.

(* P3's spectral step: with a positive eigengap, TopEig_R(K) spans a subspace fixed by K: any
   other TopEig_R(K) spans the same one. *)
Theorem top_eig_unique (U U' : 'M[R]_(n, rk)) (lam lam' : 'rV[R]_rk) :
  K^T = K -> top_eig K U lam -> eigengap U lam -> top_eig K U' lam' -> (U'^T == U^T)%MS.
Proof.
move=> hK [hU hKU hrayU] hgap [hU' hKU' hrayU'].
have [W0|/nonzero_row [j hj]] := eqVneq (U'^T *m (1%:M - U *m U^T)) 0.
  exact: same_span_of hU hU' W0.
have [V0|/nonzero_row [i hi]] := eqVneq (U^T *m (1%:M - U' *m U'^T)) 0.
  exact: eqmxb_sym (same_span_of hU' hU V0).
have hx := projected_eigen j hK hKU hKU'.
have hy := projected_eigen i hK hKU' hKU.
set x := row j _ in hj hx; set y := row i _ in hi hy.
have hxU : x *m U = 0.
  by rewrite /x -row_mul -mulmxA mulmxBl mul1mx -mulmxA hU mulmx1 subrr mulmx0 row0.
have hyU' : y *m U' = 0.
  by rewrite /y -row_mul -mulmxA mulmxBl mul1mx -mulmxA hU' mulmx1 subrr mulmx0 row0.
have gx := hgap x i hj hxU; have gy := hrayU' y j hyU'.
rewrite hx -scalemxAl mxtraceZ ltr_pmul2r ?tr_sq_gt0 // in gx.
rewrite hy -scalemxAl mxtraceZ ler_pmul2r ?tr_sq_gt0 // in gy.
by have := lt_le_trans gx gy; rewrite ltxx.
Qed.

End Unique.

Section P3TopEig.
Variable R : realFieldType.
Variables (N d k rk : nat) (r u u' : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (G : forall i, 'M[R]_(r i)).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (U' : forall i, 'M[R]_(d, u' i)) (C' : forall i, 'M[R]_(u' i, k)).
Variables (Uref Uref' : 'M[R]_(d, rk)) (lam lam' : 'rV[R]_rk).

(* P3, the paper's Proposition 2, with U_ref = TopEig_R(K) by definition and a positive
   eigengap: per-client gauges ("qr" mode) leave the server update unchanged, whichever
   TopEig_R the gauged round picks. *)
Theorem P3_update_gauge_invariant_top_eig :
  (forall i, G i \in unitmx) ->
  (forall i, (U i)^T *m U i = 1%:M) -> (forall i, (U' i)^T *m U' i = 1%:M) ->
  (forall i, ((U i)^T == (B i)^T)%MS) -> (forall i, ((U' i)^T == (B i *m G i)^T)%MS) ->
  top_eig (consensus p U) Uref lam -> eigengap (consensus p U) Uref lam ->
  top_eig (consensus p U') Uref' lam' ->
  (forall i, U i *m C i = B i *m A i) ->
  (forall i, U' i *m C' i = (B i *m G i) *m (invmx (G i) *m A i)) ->
  Uref' *m coords p Uref' U' C' = Uref *m coords p Uref U C.
Proof.
move=> uG hU hU' eU eU' ht hg ht' hUC hUC'.
have eK := P3_consensus_gauge_invariant p uG hU hU' eU eU'.
rewrite -eK in ht'.
have e := top_eig_unique (consensus_sym p U) ht hg ht'.
have [hUr _ _] := ht; have [hUr' _ _] := ht'.
exact: P3_update_gauge_invariant uG hUr hUr' (eqmxb_sym e) hUC hUC'.
Qed.

End P3TopEig.

Section P11TopEigGauge.
Variable R : realFieldType.
Variables (N d k rk : nat) (r v v' : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (G : forall i, 'M[R]_(r i)).
Variables (V : forall i, 'M[R]_(k, v i)) (V' : forall i, 'M[R]_(k, v' i)).
Variables (Vref Vref' : 'M[R]_(k, rk)) (lam lam' : 'rV[R]_rk).

(* P11's gauge invariance with V_ref = TopEig_R(K_R) by definition and a positive eigengap. *)
Theorem P11_right_update_gauge_invariant_top_eig :
  (forall i, G i \in unitmx) ->
  (forall i, (V i)^T *m V i = 1%:M) -> (forall i, (V' i)^T *m V' i = 1%:M) ->
  (forall i, ((V i)^T == A i)%MS) -> (forall i, ((V' i)^T == invmx (G i) *m A i)%MS) ->
  top_eig (consensus p V) Vref lam -> eigengap (consensus p V) Vref lam ->
  top_eig (consensus p V') Vref' lam' ->
  right_coords p (fun i => B i *m G i) (fun i => invmx (G i) *m A i) Vref' *m Vref'^T =
  right_coords p B A Vref *m Vref^T.
Proof.
move=> uG hV hV' eV eV' ht hg ht'.
have eK := P11_right_consensus_gauge_invariant p uG hV hV' eV eV'.
rewrite -eK in ht'.
have e := top_eig_unique (consensus_sym p V) ht hg ht'.
have [hVr _ _] := ht; have [hVr' _ _] := ht'.
have hh := P11_right_update_gauge_invariant p B A uG hVr hVr' (eqmxb_sym e).
exact: hh.
Qed.

End P11TopEigGauge.

Section P5TopEig.
Variable R : realFieldType.
Variables (N d rk : nat) (r u u' : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (c : 'I_N -> R).
Variables (U : forall i, 'M[R]_(d, u i)) (U' : forall i, 'M[R]_(d, u' i)).
Variables (Uref Uref' : 'M[R]_(d, rk)) (lam lam' : 'rV[R]_rk).

(* P5 for U_ref: scaling clients (c_i != 0) leaves span(TopEig_R(K)) unchanged, with a positive
   eigengap. *)
Theorem P5_top_eig_scale_invariant :
  (forall i, c i != 0) ->
  (forall i, (U i)^T *m U i = 1%:M) -> (forall i, (U' i)^T *m U' i = 1%:M) ->
  (forall i, ((U i)^T == (B i)^T)%MS) -> (forall i, ((U' i)^T == (c i *: B i)^T)%MS) ->
  top_eig (consensus p U) Uref lam -> eigengap (consensus p U) Uref lam ->
  top_eig (consensus p U') Uref' lam' -> (Uref'^T == Uref^T)%MS.
Proof.
move=> hc hU hU' eU eU' ht hg ht'.
have eK := P5_consensus_scale_invariant p hc hU hU' eU eU'.
rewrite -eK in ht'.
exact: top_eig_unique (consensus_sym p U) ht hg ht'.
Qed.

End P5TopEig.
