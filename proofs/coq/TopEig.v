(* GLoRA.TopEig: TopEig_R(K) by its definition, and P2 and P11 with no assumed spectral step.

   U_ref = TopEig_R(K) is defined by what an eigensolver's top-R output satisfies: orthonormal
   columns, K U = U diag(lam), and no direction orthogonal to col(U) has a Rayleigh quotient
   above any kept eigenvalue. From that definition alone (no spectral theorem), for the
   consensus matrix K = sum_i p_i U_i U_i^T with nonnegative weights and R >= rank K, col(U_ref)
   contains range(K) ([top_eig_contains_range]); P2 and P11 follow. That such a U exists for
   every symmetric K is the spectral theorem, which this file does not prove. *)

From mathcomp Require Import all_ssreflect all_algebra.
From GLoRA Require Import Core Projection.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory Order.Theory.
Local Open Scope ring_scope.

Section TopEigDef.
Variable R : realFieldType.
Variables (d rk : nat).

(* U (d x rk) holds top-rk eigenvectors of K with eigenvalues lam. *)
Definition top_eig (K : 'M[R]_d) (U : 'M[R]_(d, rk)) (lam : 'rV[R]_rk) : Prop :=
  [/\ U^T *m U = 1%:M, K *m U = U *m diag_mx lam &
      forall (x : 'rV[R]_d) (j : 'I_rk),
        x *m U = 0 -> \tr (x *m K *m x^T) <= lam 0 j * \tr (x *m x^T)].

End TopEigDef.

Section Quadratic.
Variable R : realFieldType.
Variables (N d : nat) (u : 'I_N -> nat) (p : 'I_N -> R) (U : forall i, 'M[R]_(d, u i)).

(* tr(X K X^T) = sum_j p_j ||X U_j||_F^2: K is positive semidefinite for p >= 0. *)
Lemma consensus_quad m (X : 'M[R]_(m, d)) :
  \tr (X *m consensus p U *m X^T) = \sum_j p j * fro2 (X *m U j).
Proof.
rewrite /consensus mulmx_sumr mulmx_suml raddf_sum; apply: eq_bigr => j _ /=.
rewrite -scalemxAr -scalemxAl mxtraceZ; congr (_ * _).
have -> : X *m (U j *m (U j)^T) *m X^T = (X *m U j) *m (X *m U j)^T.
  by rewrite trmx_mul !mulmxA.
by rewrite /fro2 mxtrace_mulC.
Qed.

Lemma consensus_quad_ge0 m (X : 'M[R]_(m, d)) :
  (forall j, 0 <= p j) -> 0 <= \tr (X *m consensus p U *m X^T).
Proof.
by move=> hp; rewrite consensus_quad sumr_ge0 // => j _; rewrite mulr_ge0 ?fro2_ge0.
Qed.

(* tr(X K X^T) = 0 forces X K = 0 (p >= 0). *)
Lemma consensus_quad_eq0 m (X : 'M[R]_(m, d)) :
  (forall j, 0 <= p j) -> \tr (X *m consensus p U *m X^T) = 0 -> X *m consensus p U = 0.
Proof.
move=> hp; rewrite consensus_quad => e.
have h0 := psumr_eq0P (fun j _ => mulr_ge0 (hp j) (fro2_ge0 (X *m U j))) e.
rewrite /consensus mulmx_sumr big1 // => j _.
have /eqP := h0 j isT; rewrite mulf_eq0 => /orP[/eqP ->|/eqP/fro2_eq0 hX].
  by rewrite scale0r mulmx0.
by rewrite -scalemxAr mulmxA hX mul0mx scaler0.
Qed.

End Quadratic.

Section Range.
Variable R : realFieldType.
Variables (N d rk : nat) (u : 'I_N -> nat) (p : 'I_N -> R) (U : forall i, 'M[R]_(d, u i)).
Variables (Uref : 'M[R]_(d, rk)) (lam : 'rV[R]_rk).

Let K := consensus p U.

Lemma orthonormal_rank : Uref^T *m Uref = 1%:M -> \rank Uref^T = rk.
Proof.
move=> hU; apply/eqP; rewrite eqn_leq rank_leq_row /=.
by rewrite -{1}(mxrank1 R rk) -hU mxrankM_maxl.
Qed.

(* With nonnegative weights and R >= rank K, TopEig_R(K) contains range(K) (col = row space
   of the symmetric K). Two cases: every kept eigenvalue positive (then col(U_ref) is inside
   range(K) and the ranks force equality), or some kept eigenvalue <= 0 (then every direction
   orthogonal to col(U_ref) has Rayleigh quotient <= 0, hence is in the kernel of the
   semidefinite K, so K = U_ref U_ref^T K). *)
Theorem top_eig_contains_range :
  (forall j, 0 <= p j) -> top_eig K Uref lam -> (\rank K <= rk)%N -> (K <= Uref^T)%MS.
Proof.
move=> hp [hU hKU hray] hrk.
have Ksym : K^T = K by exact: consensus_sym.
have [j hj|hpos] := pickP (fun j => lam 0 j <= 0).
  (* some kept eigenvalue <= 0: (1 - U U^T) K = 0 *)
  pose X := 1%:M - Uref *m Uref^T.
  have hXU : X *m Uref = 0 by rewrite mulmxBl mul1mx -mulmxA hU mulmx1 subrr.
  have hXK : X *m K = 0.
    apply/row_matrixP => i; rewrite row_mul row0.
    apply: (consensus_quad_eq0 hp); apply/eqP; rewrite eq_le.
    rewrite (consensus_quad_ge0 _ _ hp) andbT.
    apply: (le_trans (hray (row i X) j _)); first by rewrite -row_mul hXU row0.
    rewrite mulr_le0_ge0 //.
    exact: tr_sq_ge0.
  have eK : K = Uref *m Uref^T *m K.
    by apply/eqP; rewrite -subr_eq0 -{1}[K]mul1mx -mulmxBl hXK.
  rewrite -Ksym eK !trmx_mul trmxK mulmxA.
  exact: submxMl.
(* every kept eigenvalue > 0: U = K U diag(lam)^-1, so col(U_ref) is inside range(K) *)
have hunit : diag_mx lam \in unitmx.
  rewrite unitmxE unitfE det_diag; apply/prodf_neq0 => j _.
  by have /negbT := hpos j; rewrite -ltNge => /lt0r_neq0.
have eU : Uref = K *m Uref *m invmx (diag_mx lam).
  by rewrite hKU mulmxK.
have hsub : (Uref^T <= K)%MS.
  by rewrite eU !trmx_mul mulmxA Ksym submxMl.
have [_ eq] := mxrank_leqif_sup hsub.
rewrite -eq orthonormal_rank //; apply/eqP.
by apply/eqP; rewrite eqn_leq hrk -(orthonormal_rank hU) mxrankS.
Qed.

End Range.

Section ClientSpan.
Variable R : fieldType.
Variables (N d : nat) (u : 'I_N -> nat) (p : 'I_N -> R) (U : forall i, 'M[R]_(d, u i)).

(* range(K) is inside the sum of the client subspaces, so rank K <= dim sum_i col(U_i): the
   paper's hypothesis R >= dim sum_i col(U_i) gives R >= rank K. *)
Lemma consensus_in_client_span : (consensus p U <= \sum_i <<(U i)^T>>)%MS.
Proof.
rewrite /consensus summx_sub // => i _; rewrite scalemx_sub //.
apply: submx_trans (submxMl _ _) _.
by apply: (sumsmx_sup i) => //; rewrite genmxE.
Qed.

Lemma consensus_rank_le : (\rank (consensus p U) <= \rank (\sum_i <<(U i)^T>>)%MS)%N.
Proof. exact: mxrankS consensus_in_client_span. Qed.

End ClientSpan.

Section P2TopEig.
Variable R : realFieldType.
Variables (N d k rk : nat) (u r : 'I_N -> nat) (p : 'I_N -> R).
Variables (Uref : 'M[R]_(d, rk)) (lam : 'rV[R]_rk).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).

(* P2, the paper's Proposition 1, with U_ref = TopEig_R(K) by definition and no assumed
   spectral step: nonnegative weights, R >= dim sum_i col(U_i), client bases that reproduce
   the updates (U_i C_i = B_i A_i): the server update U_ref S is the mean update. *)
Theorem P2_exact_top_eig :
  (forall j, 0 <= p j) ->
  top_eig (consensus p U) Uref lam ->
  (\rank (\sum_i <<(U i)^T>>)%MS <= rk)%N ->
  (forall i, U i *m C i = B i *m A i) ->
  Uref *m coords p Uref U C = mean_update p B A.
Proof.
move=> hp htop hrk hUC; have [hU _ _] := htop.
have hK := top_eig_contains_range hp htop (leq_trans (consensus_rank_le p U) hrk).
exact: P2_exact_if_consensus_range_in hp hU hK hUC.
Qed.

End P2TopEig.

Section P11TopEig.
Variable R : realFieldType.
Variables (N d k rk : nat) (r v : 'I_N -> nat) (p : 'I_N -> R).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).
Variables (Vref : 'M[R]_(k, rk)) (lam : 'rV[R]_rk) (V : forall i, 'M[R]_(k, v i)).

(* P11 with V_ref = TopEig_R(K_R), K_R = sum_i p_i V_i V_i^T, by definition: nonnegative
   weights, row(A_i) inside col(V_i), R >= dim sum_i col(V_i): S' V_ref^T = W_bar. *)
Theorem P11_exact_top_eig :
  (forall j, 0 <= p j) ->
  top_eig (consensus p V) Vref lam ->
  (\rank (\sum_i <<(V i)^T>>)%MS <= rk)%N ->
  (forall i, (A i <= (V i)^T)%MS) ->
  right_coords p B A Vref *m Vref^T = mean_update p B A.
Proof.
move=> hp htop hrk hA; have [hV _ _] := htop.
have hK := top_eig_contains_range hp htop (leq_trans (consensus_rank_le p V) hrk).
exact: P11_exact_if_right_consensus_range_in hp hV hA hK.
Qed.

End P11TopEig.
