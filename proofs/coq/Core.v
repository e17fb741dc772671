(* GLoRA.Core: the objects of SPEC.md and the lemmas shared by the proposition files.

   Conventions (mathcomp):
   - 'M[R]_(m, n) are m x n matrices, A *m B the product, A^T the transpose, 1%:M the identity,
     a *: A scalar multiplication, \tr the trace.
   - N clients are indexed by 'I_N; client i has rank r i (ranks may differ between clients);
     p : 'I_N -> R are the weights.
   - mathcomp's subspace algebra (mxalgebra) works with ROW spaces: (X <= Y)%MS says
     row(X) is contained in row(Y). Column spaces are written through transposes:
     (X^T <= U^T)%MS says col(X) is contained in col(U), and (X^T == U^T)%MS that col(X) = col(U).
   Nothing here is assumed: there are no axioms, parameters or admitted lemmas. *)

From mathcomp Require Import all_ssreflect all_algebra.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

(* ------------------------------------------------------------------------------ definitions *)

Section Definitions.
Variable R : ringType.
Variables (N d k : nat) (r : 'I_N -> nat) (p : 'I_N -> R).

(* The mean update W_bar = sum_i p_i B_i A_i (scale-folded factors). *)
Definition mean_update (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) :
  'M[R]_(d, k) := \sum_(i < N) p i *: (B i *m A i).

(* The consensus matrix K = sum_i p_i U_i U_i^T (d x d). *)
Definition consensus (U : forall i, 'M[R]_(d, r i)) : 'M[R]_d :=
  \sum_(i < N) p i *: (U i *m (U i)^T).

(* GLoRA's shared-reference coordinates S = sum_i p_i (U_ref^T U_i) C_i (R' x k). *)
Definition coords R' (Uref : 'M[R]_(d, R')) (U : forall i, 'M[R]_(d, r i))
    (C : forall i, 'M[R]_(r i, k)) : 'M[R]_(R', k) :=
  \sum_(i < N) p i *: (Uref^T *m U i *m C i).

(* Right-side coordinates S' = sum_i p_i B_i (A_i V_ref) (d x R'). *)
Definition right_coords R' (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k))
    (Vref : 'M[R]_(k, R')) : 'M[R]_(d, R') :=
  \sum_(i < N) p i *: (B i *m (A i *m Vref)).

End Definitions.

Section FedITDef.
Variable R : ringType.
Variables (N d k r : nat) (p : 'I_N -> R).

(* FedIT: B_bar = sum_i p_i B_i, A_bar = sum_i p_i A_i (equal ranks), product B_bar A_bar. *)
Definition factor_mean m n (F : 'I_N -> 'M[R]_(m, n)) : 'M[R]_(m, n) := \sum_(i < N) p i *: F i.

Definition fedit (B : 'I_N -> 'M[R]_(d, r)) (A : 'I_N -> 'M[R]_(r, k)) : 'M[R]_(d, k) :=
  factor_mean B *m factor_mean A.

End FedITDef.

(* The squared Frobenius norm ||X||_F^2 = tr(X^T X). *)
Definition fro2 (R : ringType) m n (X : 'M[R]_(m, n)) : R := \tr (X^T *m X).

(* ---------------------------------------------------------------------- sums and products *)

Section Linearity.
Variable R : comRingType.

Lemma wsum_mull (I : finType) m n q (M : 'M[R]_(m, n)) (p : I -> R) (F : I -> 'M[R]_(n, q)) :
  \sum_i p i *: (M *m F i) = M *m \sum_i p i *: F i.
Proof. by rewrite mulmx_sumr; apply: eq_bigr => i _; rewrite scalemxAr. Qed.

Lemma wsum_mulr (I : finType) m n q (M : 'M[R]_(n, q)) (p : I -> R) (F : I -> 'M[R]_(m, n)) :
  \sum_i p i *: (F i *m M) = (\sum_i p i *: F i) *m M.
Proof. by rewrite mulmx_suml; apply: eq_bigr => i _; rewrite scalemxAl. Qed.

Lemma trmxZ m n a (X : 'M[R]_(m, n)) : (a *: X)^T = a *: X^T.
Proof. by apply/matrixP => i j; rewrite !mxE. Qed.

Lemma trmxN m n (X : 'M[R]_(m, n)) : (- X)^T = - X^T.
Proof. by apply/matrixP => i j; rewrite !mxE. Qed.

Lemma trmxB m n (X Y : 'M[R]_(m, n)) : (X - Y)^T = X^T - Y^T.
Proof. by apply/matrixP => i j; rewrite !mxE. Qed.

Lemma trmx_wsum (I : finType) m n (p : I -> R) (F : I -> 'M[R]_(m, n)) :
  (\sum_i p i *: F i)^T = \sum_i p i *: (F i)^T.
Proof. by rewrite raddf_sum; apply: eq_bigr => i _; apply/matrixP => x y; rewrite !mxE. Qed.

(* With U_i C_i = B_i A_i (U_i may have another number of columns u i than B_i's r i, as in
   the "svd" gauge fixing), GLoRA's coordinates are S = U_ref^T W_bar (no hypothesis on U_ref). *)
Lemma coords_mean N d k (u r : 'I_N -> nat) (p : 'I_N -> R) R' (Uref : 'M[R]_(d, R'))
    (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k))
    (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) :
  (forall i, U i *m C i = B i *m A i) ->
  coords p Uref U C = Uref^T *m mean_update p B A.
Proof.
move=> hUC; rewrite /coords /mean_update -wsum_mull.
by apply: eq_bigr => i _; rewrite -mulmxA hUC.
Qed.

(* Right side: S' = W_bar V_ref. *)
Lemma right_coords_mean N d k (r : 'I_N -> nat) (p : 'I_N -> R) R'
    (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (Vref : 'M[R]_(k, R')) :
  right_coords p B A Vref = mean_update p B A *m Vref.
Proof.
rewrite /right_coords /mean_update -wsum_mulr.
by apply: eq_bigr => i _; rewrite mulmxA.
Qed.

End Linearity.

(* ------------------------------------------------------------------- orthogonal projectors *)

Section Projectors.
Variable R : comRingType.

Lemma proj_sym d r (U : 'M[R]_(d, r)) : (U *m U^T)^T = U *m U^T.
Proof. by rewrite trmx_mul trmxK. Qed.

Lemma proj_idem d r (U : 'M[R]_(d, r)) :
  U^T *m U = 1%:M -> (U *m U^T) *m (U *m U^T) = U *m U^T.
Proof. by move=> hU; rewrite mulmxA -(mulmxA U) hU mulmx1. Qed.

(* A change of orthonormal basis U' = U Q of the same space leaves the projector unchanged
   (Q is square; Q^T Q = 1 follows from the hypotheses, hence Q Q^T = 1). *)
Lemma proj_basis_change d r (U U' : 'M[R]_(d, r)) (Q : 'M[R]_r) :
  U^T *m U = 1%:M -> U'^T *m U' = 1%:M -> U' = U *m Q -> U' *m U'^T = U *m U^T.
Proof.
move=> hU hU' eU'.
have hQ : Q^T *m Q = 1%:M.
  by rewrite -hU' eU' trmx_mul -mulmxA (mulmxA U^T) hU mul1mx.
have hQ' : Q *m Q^T = 1%:M by apply: mulmx1C.
by rewrite eU' trmx_mul mulmxA -(mulmxA U) hQ' mulmx1.
Qed.

End Projectors.

Section ProjectorsField.
Variable R : fieldType.

(* col(X) inside col(U) written with mathcomp's row spaces: X = U D for some D. *)
Lemma colsubP d r m (U : 'M[R]_(d, r)) (X : 'M[R]_(d, m)) :
  reflect (exists D : 'M[R]_(r, m), X = U *m D) (X^T <= U^T)%MS.
Proof.
apply: (iffP submxP) => [[D eD]|[D eD]].
  by exists D^T; rewrite -[X]trmxK eD trmx_mul trmxK.
by exists D^T; rewrite eD trmx_mul.
Qed.

(* U U^T fixes every matrix whose columns lie in col(U), when U^T U = 1. *)
Lemma proj_fix d r m (U : 'M[R]_(d, r)) (X : 'M[R]_(d, m)) :
  U^T *m U = 1%:M -> (X^T <= U^T)%MS -> U *m U^T *m X = X.
Proof.
by move=> hU /colsubP[D ->]; rewrite mulmxA -(mulmxA U) hU mulmx1.
Qed.

(* Right side: X V V^T = X for every X whose rows lie in col(V) = row(V^T), when V^T V = 1. *)
Lemma proj_fix_right k r m (V : 'M[R]_(k, r)) (X : 'M[R]_(m, k)) :
  V^T *m V = 1%:M -> (X <= V^T)%MS -> X *m V *m V^T = X.
Proof.
by move=> hV /submxP[D ->]; rewrite -!mulmxA (mulmxA V^T) hV mul1mx.
Qed.

(* Orthonormal bases of the same column space give the same orthogonal projector; the two
   bases may even have different numbers of columns. *)
Lemma proj_colspace d r1 r2 (U : 'M[R]_(d, r1)) (V : 'M[R]_(d, r2)) :
  U^T *m U = 1%:M -> V^T *m V = 1%:M -> (U^T == V^T)%MS -> U *m U^T = V *m V^T.
Proof.
move=> hU hV /andP[sUV sVU].
have hPUV : U *m U^T *m (V *m V^T) = V *m V^T by rewrite mulmxA proj_fix.
have hPVU : V *m V^T *m (U *m U^T) = U *m U^T by rewrite mulmxA proj_fix.
by move: (congr1 trmx hPUV); rewrite trmx_mul !proj_sym hPVU.
Qed.

Lemma eqmxb_sym m1 m2 n (X : 'M[R]_(m1, n)) (Y : 'M[R]_(m2, n)) :
  (X == Y)%MS -> (Y == X)%MS.
Proof. by move=> /eqmxP e; apply/eqmxP; apply: eqmx_sym. Qed.

Lemma eqmxb_trans m1 m2 m3 n (X : 'M[R]_(m1, n)) (Y : 'M[R]_(m2, n)) (Z : 'M[R]_(m3, n)) :
  (X == Y)%MS -> (Y == Z)%MS -> (X == Z)%MS.
Proof. by move=> /eqmxP e1 /eqmxP e2; apply/eqmxP; apply: eqmx_trans e1 e2. Qed.

(* A right factor that is invertible does not change the column space: col(B G) = col(B). *)
Lemma colspace_mul_unit d r (B : 'M[R]_(d, r)) (G : 'M[R]_r) :
  G \in unitmx -> ((B *m G)^T == B^T)%MS.
Proof.
move=> uG; rewrite trmx_mul; apply/eqmxP; apply: eqmxMfull.
by rewrite row_full_unit unitmx_tr.
Qed.

End ProjectorsField.

(* ------------------------------------------------------------------- Frobenius norm facts *)

Section Fro.
Variable R : comRingType.

Lemma fro2E m n (X : 'M[R]_(m, n)) : fro2 X = \sum_(j < n) \sum_(i < m) X i j ^+ 2.
Proof.
rewrite /fro2 /mxtrace; apply: eq_bigr => j _; rewrite mxE.
by apply: eq_bigr => i _; rewrite mxE expr2.
Qed.

Lemma fro2_tr m n (X : 'M[R]_(m, n)) : fro2 X^T = fro2 X.
Proof. by rewrite /fro2 trmxK mxtrace_mulC. Qed.

End Fro.

Section FroNum.
Variable R : realDomainType.

Lemma fro2_ge0 m n (X : 'M[R]_(m, n)) : 0 <= fro2 X.
Proof. by rewrite fro2E; apply: sumr_ge0 => j _; apply: sumr_ge0 => i _; apply: sqr_ge0. Qed.

Lemma fro2_eq0 m n (X : 'M[R]_(m, n)) : fro2 X = 0 -> X = 0.
Proof.
rewrite fro2E => h; apply/matrixP => i j; rewrite mxE.
have hj := psumr_eq0P (fun j _ => sumr_ge0 _ (fun i _ => sqr_ge0 (X i j))) h.
have hij := psumr_eq0P (fun i _ => sqr_ge0 (X i j)) (hj j isT).
by apply/eqP; rewrite -sqrf_eq0 hij.
Qed.

(* tr(X X^T) is the energy of X's rows: never negative, and positive unless X = 0. *)
Lemma tr_sq_ge0 m n (X : 'M[R]_(m, n)) : 0 <= \tr (X *m X^T).
Proof. by have := fro2_ge0 X^T; rewrite /fro2 trmxK. Qed.

Lemma tr_sq_gt0 m n (X : 'M[R]_(m, n)) : X != 0 -> 0 < \tr (X *m X^T).
Proof.
move=> x0; have e : \tr (X *m X^T) = fro2 X^T by rewrite /fro2 trmxK.
rewrite e lt0r fro2_ge0 andbT; apply: contra x0 => /eqP /fro2_eq0 h.
by rewrite -[X]trmxK h trmx0.
Qed.

End FroNum.
