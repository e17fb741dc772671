(* GLoRA.EckartYoung: Ky Fan's trace inequality for a TopEig, Eckart-Young in the Frobenius norm,
   and P4 (the readout is a best rank-r approximation of the server update) and P8 (the server
   update is no closer to W_bar than W_bar's best rank-R approximation, with equality when
   col(U_ref) contains W_bar's top-R left singular subspace).

   Best rank-r approximations are stated through TopEig_r of the Gram matrix W W^T (its top-r
   eigenvectors are W's top-r left singular vectors), so no SVD is needed: the projection
   U U^T W onto any TopEig_r(W W^T) is at least as close to W as every product Y Z of inner
   dimension r (every matrix of rank <= r). The proof: the residual of Y Z is at least that of
   the projection onto an orthonormal Q spanning col(Y) (P12), which is ||W||^2 - tr(Q^T W W^T Q);
   and tr(Q^T G Q) <= tr(U^T G U) for every orthonormal Q (Ky Fan, from the definition of
   TopEig alone: split G along col(U) and its orthogonal complement). *)

From mathcomp Require Import all_ssreflect all_algebra all_field.
From GLoRA Require Import Core Projection Certificate TopEig Spectral.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory Order.Theory.
Local Open Scope ring_scope.

Section Traces.
Variable R : comRingType.

Lemma diag_entry m n (A : 'M[R]_(m, n)) (M : 'M[R]_n) i :
  (A *m M *m A^T) i i = \tr (row i A *m M *m (row i A)^T).
Proof.
rewrite /mxtrace big_ord1 !mxE; apply: eq_bigr => l _; rewrite !mxE.
by congr (_ * _); apply: eq_bigr => t _; rewrite !mxE.
Qed.

Lemma tr_rows m n (A : 'M[R]_(m, n)) (M : 'M[R]_n) :
  \tr (A *m M *m A^T) = \sum_i \tr (row i A *m M *m (row i A)^T).
Proof. by rewrite {1}/mxtrace; apply: eq_bigr => i _; rewrite diag_entry. Qed.

Lemma diag_entry1 m n (A : 'M[R]_(m, n)) i :
  (A *m A^T) i i = \tr (row i A *m (row i A)^T).
Proof. by have := diag_entry A 1%:M i; rewrite !mulmx1. Qed.

Lemma tr_rows1 m n (A : 'M[R]_(m, n)) :
  \tr (A *m A^T) = \sum_i \tr (row i A *m (row i A)^T).
Proof.
have := tr_rows A 1%:M; rewrite mulmx1 => ->.
by apply: eq_bigr => i _; rewrite mulmx1.
Qed.

End Traces.

Section KyFan.
Variable R : realFieldType.

(* For an orthonormal Q, 1 - Q Q^T is a symmetric idempotent ... *)
Lemma compl_proj_sq n r (Q : 'M[R]_(n, r)) :
  Q^T *m Q = 1%:M -> (1%:M - Q *m Q^T) *m (1%:M - Q *m Q^T)^T = 1%:M - Q *m Q^T.
Proof.
move=> hQ; rewrite trmxB trmx1 proj_sym mulmxBl mul1mx mulmxBr mulmx1 (proj_idem hQ).
by rewrite subrr subr0.
Qed.

(* ... so projecting rows onto orthonormal directions never increases their energy. *)
Lemma tr_proj_le m n r (x : 'M[R]_(m, n)) (Q : 'M[R]_(n, r)) :
  Q^T *m Q = 1%:M -> \tr (x *m (Q *m Q^T) *m x^T) <= \tr (x *m x^T).
Proof.
move=> hQ; rewrite -subr_ge0 -linearB /=.
have -> : x *m x^T - x *m (Q *m Q^T) *m x^T =
    (x *m (1%:M - Q *m Q^T)) *m (x *m (1%:M - Q *m Q^T))^T.
  rewrite [in RHS]trmx_mul [in RHS]mulmxA -[in RHS](mulmxA x) (compl_proj_sq hQ).
  by rewrite [in RHS]mulmxBr [in RHS]mulmx1 [in RHS]mulmxBl.
exact: tr_sq_ge0.
Qed.

(* Ky Fan for a TopEig: the trace of G on any r orthonormal directions is at most its trace on
   a TopEig_r(G). *)
Theorem ky_fan n r (G : 'M[R]_n) (U Q : 'M[R]_(n, r)) (lam : 'rV[R]_r) :
  G^T = G -> top_eig G U lam -> Q^T *m Q = 1%:M ->
  \tr (Q^T *m G *m Q) <= \tr (U^T *m G *m U).
Proof.
case: r U Q lam => [|r] U Q lam hG [hU hGU hray] hQ.
  by rewrite /mxtrace !big_ord0.
pose Pi := U *m U^T; pose L := U *m diag_mx lam *m U^T.
have hPiG : Pi *m G = L.
  by rewrite /Pi /L -mulmxA -{1}hG -trmx_mul hGU trmx_mul tr_diag_mx mulmxA.
have hGPi : G *m Pi = L by rewrite /Pi mulmxA hGU.
have hLPi : L *m Pi = L by rewrite /Pi /L -!mulmxA (mulmxA U^T) hU mul1mx.
have hsplit : G = L + (1%:M - Pi) *m G *m (1%:M - Pi).
  have -> : (1%:M - Pi) *m G = G - L by rewrite mulmxBl mul1mx hPiG.
  by rewrite mulmxBr mulmx1 mulmxBl hGPi hLPi subrr subr0 addrC subrK.
have hUGU : U^T *m G *m U = diag_mx lam by rewrite -mulmxA hGU mulmxA hU mul1mx.
pose M := U^T *m Q *m Q^T *m U.
have hA : \tr (Q^T *m L *m Q) = \sum_j lam 0 j * M j j.
  have -> : Q^T *m L *m Q = (Q^T *m U *m diag_mx lam) *m (U^T *m Q) by rewrite /L !mulmxA.
  rewrite mxtrace_mulC.
  have -> : U^T *m Q *m (Q^T *m U *m diag_mx lam) = M *m diag_mx lam by rewrite /M !mulmxA.
  by rewrite mul_mx_diag /mxtrace; apply: eq_bigr => j _; rewrite mxE mulrC.
pose X := Q^T *m (1%:M - Pi).
have hXt : X^T = (1%:M - Pi) *m Q.
  by rewrite /X trmx_mul trmxK trmxB trmx1 proj_sym.
have hXU : X *m U = 0.
  by rewrite /X -mulmxA mulmxBl mul1mx /Pi -mulmxA hU mulmx1 subrr mulmx0.
have hB j0 : \tr (Q^T *m ((1%:M - Pi) *m G *m (1%:M - Pi)) *m Q) <=
             lam 0 j0 * \tr (X *m X^T).
  have -> : Q^T *m ((1%:M - Pi) *m G *m (1%:M - Pi)) *m Q = X *m G *m X^T.
    by rewrite hXt /X !mulmxA.
  rewrite (tr_rows X G) tr_rows1 mulr_sumr; apply: ler_sum => i _; apply: hray.
  by rewrite -row_mul hXU row0.
have hcomp : (1%:M - Pi) *m (1%:M - Pi) = 1%:M - Pi.
  by rewrite mulmxBl mul1mx mulmxBr mulmx1 (proj_idem hU) subrr subr0.
have hXX : \tr (X *m X^T) = \sum_j (1 - M j j).
  have -> : X *m X^T = Q^T *m Q - (U^T *m Q)^T *m (U^T *m Q).
    rewrite hXt /X -mulmxA (mulmxA (1%:M - Pi)) hcomp mulmxBl mul1mx mulmxBr.
    by rewrite trmx_mul trmxK /Pi !mulmxA.
  rewrite hQ linearB /= mxtrace1 mxtrace_mulC sumrB sumr_const card_ord.
  congr (_ - _); rewrite trmx_mul trmxK mulmxA.
  by [].
have hM j : 0 <= 1 - M j j.
  have e1 : M j j = \tr (row j U^T *m (Q *m Q^T) *m (row j U^T)^T).
    by rewrite -diag_entry trmxK /M !mulmxA.
  have e2 : 1 = \tr (row j U^T *m (row j U^T)^T).
    rewrite -diag_entry1 trmxK hU mxE eqxx /=.
    by [].
  by rewrite e1 {1}e2 subr_ge0 tr_proj_le.
rewrite hUGU mxtrace_diag {1}hsplit mulmxDr mulmxDl mxtraceD hA.
case: (arg_minP (fun j => lam 0 j) (isT : predT (@ord0 r))) => j0 _ hmin.
apply: le_trans (ler_add (lexx _) (hB j0)) _.
rewrite hXX mulr_sumr -big_split /=; apply: ler_sum => j _.
rewrite -{2}[lam 0 j](subrK (lam 0 j * M j j)) addrC ler_add2r.
by rewrite -{1}[lam 0 j]mulr1 -mulrBr ler_wpmul2r ?hM ?hmin.
Qed.

End KyFan.

Section EckartYoungThm.
Variable R : rcfType.

Lemma kept_trace d k rr (Q : 'M[R]_(d, rr)) (W : 'M[R]_(d, k)) :
  fro2 (Q^T *m W) = \tr (Q^T *m (W *m W^T) *m Q).
Proof.
rewrite /fro2 trmx_mul trmxK mxtrace_mulC.
by rewrite !mulmxA.
Qed.

Lemma residual_trace d k rr (Q : 'M[R]_(d, rr)) (W : 'M[R]_(d, k)) :
  Q^T *m Q = 1%:M -> fro2 (W - Q *m Q^T *m W) = fro2 W - \tr (Q^T *m (W *m W^T) *m Q).
Proof. by move=> hQ; rewrite P12_certificate_left // P12_kept_left // kept_trace. Qed.

(* An orthonormal Q (d x r) whose span contains col(Y), for any Y with r columns and r <= d. *)
Lemma orthonormal_cover d r (Y : 'M[R]_(d, r)) :
  (r <= d)%N -> exists Q : 'M[R]_(d, r), Q^T *m Q = 1%:M /\ Q *m Q^T *m Y = Y.
Proof.
move=> hrd.
pose K1 := consensus (fun _ : 'I_1 => (1 : R)) (fun _ : 'I_1 => Y).
have eK : K1 = Y *m Y^T by rewrite /K1 /consensus big_ord1 scale1r.
have hsym : (Y *m Y^T)^T = Y *m Y^T by rewrite trmx_mul trmxK.
have [Q [mu ht]] := top_eig_exists hsym hrd.
have hp : forall j : 'I_1, 0 <= (fun _ => 1 : R) j by move=> j; exact: ler01.
have hrk : (\rank K1 <= r)%N.
  by rewrite eK (leq_trans (mxrankM_maxl _ _)) // rank_leq_col.
rewrite -eK in ht.
have hK := top_eig_contains_range hp ht hrk.
have hY : (Y^T <= K1)%MS by apply: (consensus_contains_clients _ hp (i := ord0)); rewrite oner_eq0.
have [hQ _ _] := ht.
by exists Q; split => //; apply: proj_fix hQ (submx_trans hY hK).
Qed.

(* Eckart-Young, Frobenius norm: the projection of W onto a TopEig_r(W W^T) (its top-r left
   singular subspace) is a best approximation of W by any product Y Z of inner dimension r,
   i.e. by any matrix of rank <= r. *)
Theorem eckart_young d k r (W : 'M[R]_(d, k)) (U : 'M[R]_(d, r)) (lam : 'rV[R]_r)
    (Y : 'M[R]_(d, r)) (Z : 'M[R]_(r, k)) :
  top_eig (W *m W^T) U lam -> fro2 (W - U *m U^T *m W) <= fro2 (W - Y *m Z).
Proof.
move=> ht; have [hU _ _] := ht.
have hrd : (r <= d)%N by rewrite -(orthonormal_rank hU) rank_leq_col.
have [Q [hQ hQY]] := orthonormal_cover Y hrd.
have hsym : (W *m W^T)^T = W *m W^T by rewrite trmx_mul trmxK.
have hQW : fro2 (W - Q *m Q^T *m W) <= fro2 (W - Y *m Z).
  set E := W - Y *m Z.
  have -> : W - Q *m Q^T *m W = E - Q *m Q^T *m E.
    rewrite /E mulmxBr -mulmxA !mulmxA hQY.
    by rewrite opprB addrA subrK.
  rewrite P12_certificate_left // ler_subl_addr ler_addl.
  exact: fro2_ge0.
apply: le_trans hQW; rewrite !residual_trace // ler_add2l ler_opp2.
exact: ky_fan hsym ht hQ.
Qed.

End EckartYoungThm.

Section P8.
Variable R : rcfType.
Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref Ubest : 'M[R]_(d, rk)) (lam : 'rV[R]_rk).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

Let W := mean_update p B A.

(* P8: the server update U_ref S is no closer to W_bar than its best rank-R approximation,
   the projection onto a TopEig_R(W_bar W_bar^T) (Eckart-Young). *)
Theorem P8_optimality_gap :
  top_eig (W *m W^T) Ubest lam ->
  fro2 (W - Ubest *m Ubest^T *m W) <= fro2 (W - Uref *m coords p Uref U C).
Proof. by move=> ht; apply: eckart_young ht. Qed.

(* ... with equality when col(U_ref) contains that top-R subspace (and S = U_ref^T W_bar). *)
Theorem P8_equality :
  top_eig (W *m W^T) Ubest lam -> Uref^T *m Uref = 1%:M -> (Ubest^T <= Uref^T)%MS ->
  (forall i, U i *m C i = B i *m A i) ->
  fro2 (W - Uref *m coords p Uref U C) = fro2 (W - Ubest *m Ubest^T *m W).
Proof.
move=> [hb _ _] hU hsub hUC.
rewrite (P1_projection_of_the_mean _ _ hUC) -/W.
have e : (Ubest^T == Uref^T)%MS.
  apply/andP; split => //; have [_ eq] := mxrank_leqif_sup hsub.
  by rewrite -eq (orthonormal_rank hU) (orthonormal_rank hb).
by rewrite (proj_colspace hb hU e).
Qed.

End P8.

Section P4.
Variable R : rcfType.
Variables (d k rk r : nat) (Uref : 'M[R]_(d, rk)) (S : 'M[R]_(rk, k)).
Variables (Ut : 'M[R]_(rk, r)) (lam : 'rV[R]_r).

(* P4: the rank-r readout's product U_ref Ut Ut^T S (Ut = TopEig_r(S S^T): the top-r left
   singular vectors of S, whatever split of the singular values the factors use) is a best
   approximation of the server update U_ref S by any product Y Z of inner dimension r. *)
Theorem P4_readout_is_best :
  Uref^T *m Uref = 1%:M -> top_eig (S *m S^T) Ut lam ->
  forall (Y : 'M[R]_(d, r)) (Z : 'M[R]_(r, k)),
    fro2 (Uref *m S - Uref *m Ut *m Ut^T *m S) <= fro2 (Uref *m S - Y *m Z).
Proof.
move=> hU [ht hSU hray] Y Z.
pose V := Uref *m Ut.
have hV : V^T *m V = 1%:M by rewrite /V trmx_mul mulmxA -(mulmxA Ut^T) hU mulmx1 ht.
have hMV : (Uref *m S) *m (Uref *m S)^T *m V = V *m diag_mx lam.
  rewrite /V trmx_mul !mulmxA -(mulmxA _ Uref^T) hU mulmx1 -!mulmxA.
  by rewrite (mulmxA S) hSU mulmxA.
have hlam j : 0 <= lam 0 j.
  have e : Ut^T *m (S *m S^T) *m Ut = diag_mx lam by rewrite -mulmxA hSU mulmxA ht mul1mx.
  have := congr1 (fun M : 'M[R]_r => M j j) e; rewrite [diag_mx lam j j]mxE eqxx mulr1n => <-.
  have -> : Ut^T *m (S *m S^T) *m Ut = (Ut^T *m S) *m (Ut^T *m S)^T.
    by rewrite trmx_mul trmxK !mulmxA.
  by rewrite diag_entry1 tr_sq_ge0.
have htop : top_eig ((Uref *m S) *m (Uref *m S)^T) V lam.
  split => // x j hx.
  pose y := x *m Uref.
  have hy : y *m Ut = 0 by rewrite /y -mulmxA.
  have e1 : x *m ((Uref *m S) *m (Uref *m S)^T) *m x^T = y *m (S *m S^T) *m y^T.
    by rewrite /y trmx_mul trmx_mul !mulmxA.
  rewrite e1; apply: le_trans (hray y j hy) _; apply: ler_wpmul2l => //.
  have -> : y *m y^T = x *m (Uref *m Uref^T) *m x^T by rewrite /y trmx_mul !mulmxA.
  exact: tr_proj_le.
have := eckart_young Y Z htop.
have -> : V *m V^T *m (Uref *m S) = Uref *m Ut *m Ut^T *m S.
  by rewrite /V trmx_mul !mulmxA -(mulmxA _ Uref^T) hU mulmx1.
by [].
Qed.

(* At r = R the readout reproduces U_ref S. *)
Theorem P4_full_readout (Ut' : 'M[R]_rk) : Ut'^T *m Ut' = 1%:M -> Uref *m Ut' *m Ut'^T *m S = Uref *m S.
Proof. by move=> h; rewrite -(mulmxA Uref) (mulmx1C h) mulmx1. Qed.

End P4.
