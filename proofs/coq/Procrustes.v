(* GLoRA.Procrustes: P9's optimality. A polar factor R* of M = A_i A_ref^T (R* orthogonal with
   R*^T M symmetric positive semidefinite, which is what R* = U V^T from an SVD M = U S V^T gives)
   minimises ||R^T A_i - A_ref||_F over the orthogonal group. The proof: the residual is
   ||A_i||^2 + ||A_ref||^2 - 2 tr(R^T M), and tr(Q H) <= tr(H) for every orthogonal Q and
   semidefinite symmetric H (write H = P^T diag(d) P by the spectral theorem: the diagonal of the
   orthogonal P Q P^T is at most 1 and d >= 0). *)

From mathcomp Require Import all_ssreflect all_algebra all_field.
From GLoRA Require Import Core Certificate Spectral EckartYoung.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory Order.Theory.
Local Open Scope ring_scope.

Section Procrustes.
Variable R : rcfType.

(* H is positive semidefinite. *)
Definition psd n (H : 'M[R]_n) : Prop := forall x : 'rV[R]_n, 0 <= \tr (x *m H *m x^T).

Lemma orthogonal_diag_le1 n (O : 'M[R]_n) i : O *m O^T = 1%:M -> O i i <= 1.
Proof.
move=> hO; have := congr1 (fun M : 'M[R]_n => M i i) hO.
rewrite [1%:M i i]mxE eqxx mulr1n mxE (bigD1 i) //= mxE => e.
have hsq : O i i ^+ 2 <= 1.
  by rewrite -e expr2 ler_addl; apply: sumr_ge0 => j _; rewrite mxE -expr2 sqr_ge0.
have [//|h1] := lerP (O i i) 1.
by have := exprn_egt1 2 h1; rewrite ltNge hsq.
Qed.

Lemma tr_orth_psd n (Q H : 'M[R]_n) :
  Q *m Q^T = 1%:M -> H^T = H -> psd H -> \tr (Q *m H) <= \tr H.
Proof.
move=> hQ hH hpsd.
have [P [d [hP hPt hHd]]] := spectral_theorem hH.
have eD : P *m H *m P^T = diag_mx d.
  by rewrite hHd !mulmxA hP mul1mx -mulmxA hP mulmx1.
have e1 : \tr (Q *m H) = \tr (P *m Q *m P^T *m diag_mx d).
  by rewrite hHd !mulmxA mxtrace_mulC !mulmxA.
have e2 : \tr H = \tr (diag_mx d) by rewrite -eD mxtrace_mulC mulmxA hPt mul1mx.
have hO : (P *m Q *m P^T) *m (P *m Q *m P^T)^T = 1%:M.
  rewrite !trmx_mul trmxK !mulmxA -(mulmxA _ P^T P) hPt mulmx1 -(mulmxA _ Q Q^T) hQ mulmx1.
  by rewrite hP.
rewrite e1 e2 mul_mx_diag mxtrace_diag /mxtrace; apply: ler_sum => i _; rewrite mxE.
have d0 : 0 <= d 0 i.
  have := hpsd (row i P); rewrite -diag_entry.
  by rewrite eD mxE eqxx mulr1n.
by rewrite -{2}[d 0 i]mul1r ler_wpmul2r // orthogonal_diag_le1.
Qed.

Lemma fro2_sub m n (X Y : 'M[R]_(m, n)) :
  fro2 (X - Y) = fro2 X + fro2 Y - \tr (X^T *m Y) *+ 2.
Proof.
rewrite /fro2 trmxB mulmxBl !mulmxBr !linearB /=.
have -> : \tr (Y^T *m X) = \tr (X^T *m Y) by rewrite -mxtrace_tr trmx_mul trmxK.
by rewrite mulr2n opprB addrA opprD addrA (addrAC (\tr (X^T *m X))).
Qed.

(* P9: a polar factor of M = A_i A_ref^T minimises ||R^T A_i - A_ref||_F over O(r). *)
Theorem P9_procrustes_optimal r k (A Aref : 'M[R]_(r, k)) (Rs Rt : 'M[R]_r) :
  Rs^T *m Rs = 1%:M -> (Rs^T *m (A *m Aref^T))^T = Rs^T *m (A *m Aref^T) ->
  psd (Rs^T *m (A *m Aref^T)) -> Rt^T *m Rt = 1%:M ->
  fro2 (Rs^T *m A - Aref) <= fro2 (Rt^T *m A - Aref).
Proof.
move=> hs hsym hpsd ht.
have key (R0 : 'M[R]_r) : R0^T *m R0 = 1%:M ->
    fro2 (R0^T *m A - Aref) = fro2 A + fro2 Aref - \tr (R0^T *m (A *m Aref^T)) *+ 2.
  move=> h0; rewrite fro2_sub L1_orthonormal_left_factor ?trmxK ?(mulmx1C h0) //.
  congr (_ - _ *+ 2).
  by rewrite -mxtrace_tr trmx_mul trmxK mxtrace_mulC -mulmxA.
rewrite !key // ler_add2l ler_opp2 ler_pmuln2r //.
set H := Rs^T *m (A *m Aref^T).
have -> : Rt^T *m (A *m Aref^T) = (Rt^T *m Rs) *m H.
  by rewrite /H -mulmxA (mulmxA Rs) (mulmx1C hs) mul1mx.
apply: tr_orth_psd hsym hpsd.
by rewrite trmx_mul trmxK mulmxA -(mulmxA _ Rs) (mulmx1C hs) mulmx1 ht.
Qed.

(* The SVD route of the operator: for M = U diag(s) V^T with U, V orthogonal and s >= 0,
   R* = U V^T is a polar factor of M. *)
Lemma polar_of_svd r (U V : 'M[R]_r) (s : 'rV[R]_r) :
  U^T *m U = 1%:M -> V^T *m V = 1%:M -> (forall j, 0 <= s 0 j) ->
  [/\ (U *m V^T)^T *m (U *m V^T) = 1%:M,
      ((U *m V^T)^T *m (U *m diag_mx s *m V^T))^T = (U *m V^T)^T *m (U *m diag_mx s *m V^T)
    & psd ((U *m V^T)^T *m (U *m diag_mx s *m V^T))].
Proof.
move=> hU hV hs.
have e : (U *m V^T)^T *m (U *m diag_mx s *m V^T) = V *m diag_mx s *m V^T.
  by rewrite trmx_mul trmxK !mulmxA -(mulmxA V U^T U) hU mulmx1.
rewrite e; split.
- by rewrite trmx_mul trmxK mulmxA -(mulmxA V U^T U) hU mulmx1 (mulmx1C hV).
- by rewrite !trmx_mul trmxK tr_diag_mx mulmxA.
move=> x; set y := x *m V.
have -> : x *m (V *m diag_mx s *m V^T) *m x^T = y *m diag_mx s *m y^T.
  by rewrite /y trmx_mul !mulmxA.
rewrite mul_mx_diag /mxtrace big_ord1 mxE; apply: sumr_ge0 => j _; rewrite !mxE.
by rewrite mulrAC mulr_ge0 // -expr2 sqr_ge0.
Qed.

(* P9 with the operator's R*: from an SVD A_i A_ref^T = U diag(s) V^T, R* = U V^T minimises
   ||R^T A_i - A_ref||_F over the orthogonal group. *)
Theorem P9_procrustes_svd r k (A Aref : 'M[R]_(r, k)) (U V Rt : 'M[R]_r) (s : 'rV[R]_r) :
  U^T *m U = 1%:M -> V^T *m V = 1%:M -> (forall j, 0 <= s 0 j) ->
  A *m Aref^T = U *m diag_mx s *m V^T -> Rt^T *m Rt = 1%:M ->
  fro2 ((U *m V^T)^T *m A - Aref) <= fro2 (Rt^T *m A - Aref).
Proof.
move=> hU hV hs hM ht; have [h1 h2 h3] := polar_of_svd hU hV hs.
by apply: P9_procrustes_optimal; rewrite ?hM.
Qed.

End Procrustes.
