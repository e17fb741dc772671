(* GLoRA.GramCertificate: P16, the certificate from the two raw Gram matrices.

   For stacked raw factors B (d x m), A (m x k) and column weights D (any m x m matrix; the
   operator uses the diagonal matrix of the clients' weights), W = B D A. With Gb = B^T B,
   Pa = D A A^T D^T and any X with X^T X invertible (the operator's stored basis), the
   orthogonal projector P = X (X^T X)^-1 X^T onto the columns of X gives
     ||W||^2       = tr (Pa Gb),
     ||P W||^2     = tr ((X^T X)^-1 (X^T B) Pa (X^T B)^T),
     ||W - P W||^2 = ||W||^2 - ||P W||^2.
   Over any field. *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory.
Local Open Scope ring_scope.

Section Projector.
Variable R : fieldType.

(* The orthogonal projector onto the columns of X (when X^T X is invertible). *)
Definition projX d r (X : 'M[R]_(d, r)) : 'M[R]_d := X *m invmx (X^T *m X) *m X^T.

Lemma projX_sym d r (X : 'M[R]_(d, r)) : (projX X)^T = projX X.
Proof. by rewrite /projX !trmx_mul trmxK trmx_inv trmx_mul trmxK mulmxA. Qed.

Lemma projX_idem d r (X : 'M[R]_(d, r)) :
  X^T *m X \in unitmx -> projX X *m projX X = projX X.
Proof.
move=> hu; rewrite /projX.
rewrite -[X *m _ *m X^T *m _]mulmxA -[X *m invmx _ *m X^T]mulmxA.
rewrite !mulmxA -[X *m _ *m X^T *m X]mulmxA -[X *m invmx _ *m (X^T *m X)]mulmxA.
by rewrite mulVmx // mulmx1.
Qed.

(* Pythagoras: ||W - P W||^2 = ||W||^2 - ||P W||^2 for the projector onto the columns of X. *)
Theorem projX_pythagoras d r k (X : 'M[R]_(d, r)) (W : 'M[R]_(d, k)) :
  X^T *m X \in unitmx -> fro2 (W - projX X *m W) = fro2 W - fro2 (projX X *m W).
Proof.
move=> hu; rewrite /fro2.
set P := projX X.
have Ps : P^T = P by exact: projX_sym.
have Pi : P *m P = P by exact: projX_idem.
have kept : (P *m W)^T *m (P *m W) = W^T *m P *m W.
  by rewrite trmx_mul Ps mulmxA -[W^T *m P *m P]mulmxA Pi.
rewrite kept trmxB trmx_mul Ps mulmxBl !mulmxBr.
have -> : (W^T *m P) *m (P *m W) = W^T *m P *m W.
  by rewrite mulmxA -[W^T *m P *m P]mulmxA Pi.
by rewrite mulmxA subrr subr0 linearB.
Qed.

End Projector.

Section P16.
Variable R : fieldType.

(* ||W||^2 = tr (Pa Gb) for W = B D A. *)
Theorem P16_mean_norm d m k (B : 'M[R]_(d, m)) (D : 'M[R]_m) (A : 'M[R]_(m, k)) :
  fro2 (B *m D *m A) = \tr ((D *m A *m A^T *m D^T) *m (B^T *m B)).
Proof.
rewrite /fro2 !trmx_mul.
have -> : A^T *m (D^T *m B^T) *m (B *m D *m A) = A^T *m (D^T *m B^T *m (B *m D *m A)).
  by rewrite !mulmxA.
rewrite [\tr (A^T *m _)]mxtrace_mulC.
have -> : D *m A *m A^T *m D^T *m (B^T *m B) = (D *m A *m A^T) *m (D^T *m (B^T *m B)).
  by rewrite !mulmxA.
by rewrite [\tr ((D *m A *m A^T) *m _)]mxtrace_mulC !mulmxA.
Qed.

(* ||P W||^2 = tr ((X^T X)^-1 (X^T B) Pa (X^T B)^T) for the projector onto any X. *)
Theorem P16_kept_norm d m k r (B : 'M[R]_(d, m)) (D : 'M[R]_m) (A : 'M[R]_(m, k))
    (X : 'M[R]_(d, r)) :
  X^T *m X \in unitmx ->
  fro2 (projX X *m (B *m D *m A)) =
  \tr (invmx (X^T *m X) *m ((X^T *m B) *m (D *m A *m A^T *m D^T) *m (X^T *m B)^T)).
Proof.
move=> hu.
set W := B *m D *m A.
have kept : fro2 (projX X *m W) = \tr (W^T *m projX X *m W).
  rewrite /fro2 trmx_mul projX_sym mulmxA -[W^T *m projX X *m projX X]mulmxA.
  by rewrite projX_idem.
rewrite kept /projX.
have -> : W^T *m (X *m invmx (X^T *m X) *m X^T) *m W =
          (W^T *m X) *m (invmx (X^T *m X) *m (X^T *m W)) by rewrite !mulmxA.
rewrite mxtrace_mulC.
have eW : X^T *m W = (X^T *m B) *m (D *m A) by rewrite /W !mulmxA.
have eW' : W^T *m X = (D *m A)^T *m (X^T *m B)^T.
  by rewrite -[W^T *m X]trmxK trmx_mul trmxK eW trmx_mul.
by rewrite eW eW' !trmx_mul !mulmxA.
Qed.

(* P16: the certificate of span(X) from the two Gram matrices and X^T B. *)
Theorem P16_certificate d m k r (B : 'M[R]_(d, m)) (D : 'M[R]_m) (A : 'M[R]_(m, k))
    (X : 'M[R]_(d, r)) :
  X^T *m X \in unitmx ->
  fro2 (B *m D *m A - projX X *m (B *m D *m A)) =
  \tr ((D *m A *m A^T *m D^T) *m (B^T *m B)) -
  \tr (invmx (X^T *m X) *m ((X^T *m B) *m (D *m A *m A^T *m D^T) *m (X^T *m B)^T)).
Proof.
by move=> hu; rewrite projX_pythagoras // P16_mean_norm P16_kept_norm.
Qed.

End P16.
