(* GLoRA.Certificate: L1 (low-rank Frobenius norms) and P12 (the certificate identity).

   fro2 X := tr(X^T X) is the squared Frobenius norm (Core.fro2E: the sum of the squared
   entries). Everything here holds over any commutative ring, except the inequality
   P12_kept_le_total, which needs an ordered field. *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory.
Local Open Scope ring_scope.

Section L1.
Variable R : comRingType.

(* fro2 is the sum of the squared entries. *)
Theorem L1_fro2_is_sum_of_squares m n (X : 'M[R]_(m, n)) :
  fro2 X = \sum_(j < n) \sum_(i < m) X i j ^+ 2.
Proof. exact: fro2E. Qed.

(* A left factor with orthonormal columns does not change the norm: ||Q X|| = ||X||. *)
Theorem L1_orthonormal_left_factor d r n (Q : 'M[R]_(d, r)) (X : 'M[R]_(r, n)) :
  Q^T *m Q = 1%:M -> fro2 (Q *m X) = fro2 X.
Proof. by move=> hQ; rewrite /fro2 trmx_mul mulmxA -(mulmxA X^T) hQ mulmx1. Qed.

(* L1 as in the registry: ||Q T A||_F = ||T A||_F for B = Q T with Q^T Q = 1. *)
Theorem L1_lowrank_norm d r r' k (Q : 'M[R]_(d, r)) (T : 'M[R]_(r, r')) (A : 'M[R]_(r', k)) :
  Q^T *m Q = 1%:M -> fro2 (Q *m T *m A) = fro2 (T *m A).
Proof. by move=> hQ; rewrite -mulmxA L1_orthonormal_left_factor. Qed.

(* Right side: ||X V^T|| = ||X|| when V^T V = 1. *)
Theorem L1_orthonormal_right_factor m k r (X : 'M[R]_(m, r)) (V : 'M[R]_(k, r)) :
  V^T *m V = 1%:M -> fro2 (X *m V^T) = fro2 X.
Proof.
by move=> hV; rewrite -fro2_tr trmx_mul trmxK L1_orthonormal_left_factor // fro2_tr.
Qed.

End L1.

Section P12.
Variable R : comRingType.

(* P12, left: ||W - U U^T W||^2 = ||W||^2 - ||U U^T W||^2 when U^T U = 1. *)
Theorem P12_certificate_left d k rk (U : 'M[R]_(d, rk)) (W : 'M[R]_(d, k)) :
  U^T *m U = 1%:M -> fro2 (W - U *m U^T *m W) = fro2 W - fro2 (U *m U^T *m W).
Proof.
move=> hU; rewrite /fro2.
have Ps := proj_sym U; have Pi := proj_idem hU.
set P := U *m U^T in Ps Pi *.
have kept : (P *m W)^T *m (P *m W) = W^T *m P *m W.
  by rewrite trmx_mul Ps mulmxA -(mulmxA W^T) Pi.
rewrite kept trmxB trmx_mul Ps mulmxBl !mulmxBr.
have -> : (W^T *m P) *m (P *m W) = W^T *m P *m W by rewrite mulmxA -(mulmxA W^T) Pi.
by rewrite mulmxA subrr subr0 linearB.
Qed.

(* ||U U^T W|| = ||U^T W||: the kept part is measured on the coordinates S = U^T W. *)
Theorem P12_kept_left d k rk (U : 'M[R]_(d, rk)) (W : 'M[R]_(d, k)) :
  U^T *m U = 1%:M -> fro2 (U *m U^T *m W) = fro2 (U^T *m W).
Proof. by move=> hU; rewrite -mulmxA L1_orthonormal_left_factor. Qed.

(* P12 as in the registry: ||W - U S||^2 = ||W||^2 - ||S||^2 with S = U^T W. *)
Theorem P12_certificate_left_coords d k rk (U : 'M[R]_(d, rk)) (W : 'M[R]_(d, k)) :
  U^T *m U = 1%:M -> fro2 (W - U *m (U^T *m W)) = fro2 W - fro2 (U^T *m W).
Proof. by move=> hU; rewrite mulmxA (P12_certificate_left W hU) P12_kept_left. Qed.

(* P12, right: ||W - W V V^T||^2 = ||W||^2 - ||W V V^T||^2 when V^T V = 1. *)
Theorem P12_certificate_right d k rk (V : 'M[R]_(k, rk)) (W : 'M[R]_(d, k)) :
  V^T *m V = 1%:M -> fro2 (W - W *m V *m V^T) = fro2 W - fro2 (W *m V *m V^T).
Proof.
move=> hV; rewrite -[fro2 (W - _)]fro2_tr -[fro2 W]fro2_tr -[fro2 (W *m V *m V^T)]fro2_tr.
have e : (W *m V *m V^T)^T = V *m V^T *m W^T by rewrite -mulmxA trmx_mul proj_sym.
by rewrite trmxB e P12_certificate_left.
Qed.

(* ||W V V^T|| = ||W V||. *)
Theorem P12_kept_right d k rk (V : 'M[R]_(k, rk)) (W : 'M[R]_(d, k)) :
  V^T *m V = 1%:M -> fro2 (W *m V *m V^T) = fro2 (W *m V).
Proof. exact: L1_orthonormal_right_factor. Qed.

(* ||W - S' V^T||^2 = ||W||^2 - ||S'||^2 with S' = W V. *)
Theorem P12_certificate_right_coords d k rk (V : 'M[R]_(k, rk)) (W : 'M[R]_(d, k)) :
  V^T *m V = 1%:M -> fro2 (W - (W *m V) *m V^T) = fro2 W - fro2 (W *m V).
Proof. by move=> hV; rewrite P12_certificate_right // P12_kept_right. Qed.

End P12.

Section P12GLoRA.
Variable R : comRingType.
Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref : 'M[R]_(d, rk)) (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)) (Vref : 'M[R]_(k, rk)).

(* The certificate of a GLoRA state (U_ref, S): ||W_bar - U_ref S||^2 = ||W_bar||^2 - ||S||^2. *)
Theorem P12_certificate_glora :
  Uref^T *m Uref = 1%:M -> (forall i, U i *m C i = B i *m A i) ->
  fro2 (mean_update p B A - Uref *m coords p Uref U C) =
  fro2 (mean_update p B A) - fro2 (coords p Uref U C).
Proof.
by move=> hU hUC; rewrite (coords_mean _ _ hUC) P12_certificate_left_coords.
Qed.

(* The certificate of a right-side state (S', V_ref): ||W_bar - S' V_ref^T||^2 =
   ||W_bar||^2 - ||S'||^2. *)
Theorem P12_certificate_glora_right :
  Vref^T *m Vref = 1%:M ->
  fro2 (mean_update p B A - right_coords p B A Vref *m Vref^T) =
  fro2 (mean_update p B A) - fro2 (right_coords p B A Vref).
Proof. by move=> hV; rewrite right_coords_mean P12_certificate_right_coords. Qed.

End P12GLoRA.

Section P12Order.
Variable R : realDomainType.

(* Over an ordered ring the kept part never exceeds the total: ||S||^2 <= ||W||^2, so the
   relative residual ||W - U S||^2 / ||W||^2 lies in [0, 1]. *)
Theorem P12_kept_le_total d k rk (U : 'M[R]_(d, rk)) (W : 'M[R]_(d, k)) :
  U^T *m U = 1%:M -> fro2 (U^T *m W) <= fro2 W.
Proof.
move=> hU; rewrite -subr_ge0 -P12_certificate_left_coords //; exact: fro2_ge0.
Qed.

End P12Order.
