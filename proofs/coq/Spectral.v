(* GLoRA.Spectral: the spectral theorem for real symmetric matrices over any real closed field,
   and with it the existence of TopEig_R(K) (TopEig.top_eig) for every symmetric K and R <= n.

   The route: a real symmetric matrix has only real eigenvalues (an eigenvector over the
   algebraically closed R[i], mathcomp-real-closed's complex numbers, makes v K v^* both
   lambda |v|^2 and its own conjugate); so the restriction of K to any nonzero K-invariant
   subspace has a real eigenvalue, and a smallest one, since the real roots of its
   characteristic polynomial are finitely many. Choosing, again and again, a unit eigenvector
   of the smallest eigenvalue orthogonal to those already chosen and putting it in front gives
   an orthonormal eigenbasis with nonincreasing eigenvalues; its first R rows are a TopEig_R(K).
   P2 and P11 then hold with an existing U_ref, with nothing assumed. *)

From mathcomp Require Import all_ssreflect all_algebra all_field.
From mathcomp.real_closed Require Import complex polyrcf.
From GLoRA Require Import Core Projection TopEig.

Set Implicit Arguments.
Unset Strict Implicit.
Unset Printing Implicit Defensive.

Import GRing.Theory Num.Theory Order.Theory.
Local Open Scope ring_scope.

Section Hermitian.
Variable R : rcfType.
Local Notation C := R[i].
Local Notation toC := (real_complex R).

Lemma conj_real_mx m n (A : 'M[R]_(m, n)) : map_mx conjc (map_mx toC A) = map_mx toC A.
Proof. by apply/matrixP => i j; rewrite !mxE conjc_real. Qed.

Lemma conj_conj_mx m n (A : 'M[C]_(m, n)) : map_mx conjc (map_mx conjc A) = A.
Proof. by apply/matrixP => i j; rewrite !mxE conjcK. Qed.

(* A real symmetric matrix has only real eigenvalues, even over C. *)
Lemma symmetric_real_eigenvalue n (K : 'M[R]_n) (v : 'rV[C]_n) (z : C) :
  K^T = K -> v != 0 -> v *m map_mx toC K = z *: v -> z = ((complex.Re z)%:C)%C.
Proof.
move=> hK v0 hv.
pose KC := map_mx toC K; pose w := map_mx conjc v.
pose s := (v *m KC *m w^T) 0 0; pose nn := (v *m w^T) 0 0.
have h1 : s = z * nn by rewrite /s hv -scalemxAl mxE.
have hKC : KC^T = KC by rewrite /KC map_trmx hK.
have h2 : conjc s = s.
  have -> : conjc s = (map_mx conjc (v *m KC *m w^T)) 0 0 by rewrite mxE.
  rewrite !map_mxM map_trmx conj_real_mx conj_conj_mx -/w.
  have -> : (w *m KC *m v^T) = (v *m KC *m w^T)^T by rewrite !trmx_mul trmxK hKC mulmxA.
  by rewrite mxE.
have h3 : conjc nn = nn.
  have -> : conjc nn = (map_mx conjc (v *m w^T)) 0 0 by rewrite mxE.
  rewrite map_mxM map_trmx conj_conj_mx -/w.
  have -> : w *m v^T = (v *m w^T)^T by rewrite trmx_mul trmxK.
  by rewrite mxE.
have h4 : nn != 0.
  apply: contraNneq v0 => hn; apply/eqP/rowP => j; rewrite mxE.
  have hsum : \sum_l v 0 l * conjc (v 0 l) = 0.
    transitivity nn; last exact: hn.
    by rewrite /nn mxE; apply: eq_bigr => l _; rewrite !mxE.
  have := psumr_eq0P (fun l _ => mulcJ_ge0 (v 0 l)) hsum; move/(_ j isT).
  by move/eqP; rewrite mulf_eq0 conjc_eq0 orbb => /eqP.
have hz : conjc z = z.
  apply: (mulIf h4); rewrite -h1 -{1}h2 h1 rmorphM /= h3.
  by [].
by rewrite ReJ_add hz -mulr2n -[z *+ 2]mulr_natr mulfK // pnatr_eq0.
Qed.

End Hermitian.

Section MaxEigen.
Variable R : rcfType.
Local Notation C := R[i].
Local Notation toC := (real_complex R).

Lemma seq_has_max (x0 : R) (s : seq R) :
  exists2 m, m \in x0 :: s & forall y, y \in x0 :: s -> y <= m.
Proof.
elim: s => [|a s [m hm hmax]].
  by exists x0 => [|y]; rewrite ?mem_seq1 // => /eqP ->.
have [am|ma] := leP a m.
  exists m; first by move: hm; rewrite !inE => /orP[->|->]; rewrite ?orbT.
  move=> y; rewrite !inE => /or3P[hy|/eqP -> //|hy]; apply: hmax; by rewrite inE hy ?orbT.
exists a; first by rewrite !inE eqxx orbT.
move=> y; rewrite !inE => /or3P[hy|/eqP -> //|hy]; apply: (le_trans _ (ltW ma));
  by apply: hmax; rewrite inE hy ?orbT.
Qed.

(* An eigenvector of K inside the row space of W (row free, K-invariant) gives an eigenvalue
   of the restriction M of K to that space (M W = W K). *)
Lemma restricted_eigenvalue m n (K : 'M[R]_n) (W : 'M[R]_(m, n)) (M : 'M[R]_m)
    (x : 'rV[R]_n) (nu : R) :
  row_free W -> M *m W = W *m K -> x != 0 -> (x <= W)%MS -> x *m K = nu *: x ->
  eigenvalue M nu.
Proof.
move=> hW hMW x0 /submxP [c hc] hx; rewrite {}hc in x0 hx; apply/eigenvalueP; exists c.
  by apply: (row_free_inj hW); rewrite -mulmxA hMW mulmxA hx scalemxAl.
by apply: contraNneq x0 => ->; rewrite mul0mx.
Qed.

(* The largest eigenvalue of a real symmetric K on a nonzero K-invariant subspace exists, with
   a real eigenvector there: the eigenvalues of the restriction are real (through C, which is
   algebraically closed), and finitely many. *)
Lemma max_eigvec_in m n (K : 'M[R]_n) (W : 'M[R]_(m, n)) :
  K^T = K -> (0 < m)%N -> row_free W -> (W *m K <= W)%MS ->
  exists mu : R, exists2 x : 'rV[R]_n, x != 0 &
    [/\ (x <= W)%MS, x *m K = mu *: x &
        forall (y : 'rV[R]_n) nu, y != 0 -> (y <= W)%MS -> y *m K = nu *: y -> nu <= mu].
Proof.
move=> hK hm hW hWK.
pose M := W *m K *m pinvmx W.
have hMW : M *m W = W *m K by exact: mulmxKpV.
pose MC := map_mx toC M.
have : size (char_poly MC) != 1%N by rewrite size_char_poly -lt0n.
case/closed_rootP => z hz.
have /eigenvalueP [y hy y0] : eigenvalue MC z by rewrite eigenvalue_root_char.
pose WC := map_mx toC W.
have hWC : row_free WC by rewrite /WC row_free_map.
have hv : (y *m WC) *m map_mx toC K = z *: (y *m WC).
  by rewrite -mulmxA -map_mxM -hMW map_mxM mulmxA hy scalemxAl.
have v0 : y *m WC != 0.
  by apply: contraNneq y0 => h; apply/eqP; apply: (row_free_inj hWC); rewrite h mul0mx.
have hzr := symmetric_real_eigenvalue hK v0 hv.
have hroot : root (char_poly M) (complex.Re z).
  rewrite -(fmorph_root [rmorphism of toC]) map_char_poly -/MC /=.
  by move: hz; rewrite {1}hzr.
pose p := char_poly M.
have p0 : p != 0 by exact: monic_neq0 (char_poly_monic M).
have inR x : x \in rootsR p = root p x.
  by rewrite (roots_onP (roots_on_rootsR p0)) // in_itv.
have [mu hmu hmax] := seq_has_max (complex.Re z) (rootsR p).
have hmuroot : root p mu.
  by move: hmu; rewrite inE => /orP[/eqP ->|]; rewrite ?inR.
move: hmuroot; rewrite -eigenvalue_root_char => /eigenvalueP [c hc c0].
exists mu, (c *m W).
  by apply: contraNneq c0 => h; apply/eqP; apply: (row_free_inj hW); rewrite h mul0mx.
split; first exact: submxMl.
  by rewrite -mulmxA -hMW mulmxA hc scalemxAl.
move=> x nu x0 hxW hx; apply: hmax; rewrite inE inR -eigenvalue_root_char.
by rewrite (restricted_eigenvalue hW hMW x0 hxW hx) orbT.
Qed.

End MaxEigen.

Section Basis.
Variable R : rcfType.

Lemma kermx_invariant n k (K : 'M[R]_n) (E : 'M[R]_(k, n)) (d : 'rV[R]_k) :
  K^T = K -> E *m K = diag_mx d *m E -> (kermx E^T *m K <= kermx E^T)%MS.
Proof.
move=> hK hEK; apply/sub_kermxP.
have hKE : K *m E^T = E^T *m diag_mx d.
  by rewrite -{1}hK -trmx_mul hEK trmx_mul tr_diag_mx.
by rewrite -mulmxA hKE mulmxA mulmx_ker mul0mx.
Qed.

(* A nonzero row scaled to unit length. *)
Lemma unit_row n (x : 'rV[R]_n) :
  x != 0 -> exists2 a : R, a != 0 & (a *: x) *m (a *: x)^T = 1%:M.
Proof.
move=> x0; pose s := (x *m x^T) 0 0.
have s0 : 0 < s by have := tr_sq_gt0 x0; rewrite /mxtrace big_ord1.
have r0 : Num.sqrt s != 0 by rewrite gt_eqF // sqrtr_gt0.
exists (Num.sqrt s)^-1; first by rewrite invr_eq0.
rewrite trmxZ -scalemxAl -scalemxAr scalerA [x *m x^T]mx11_scalar -/s scale_scalar_mx.
by rewrite -expr2 exprVn sqr_sqrtr ?ltW // mulVf ?gt_eqF.
Qed.

Lemma diag_mx11 (a : R) : diag_mx (a%:M : 'rV[R]_1) = a%:M.
Proof. by apply/matrixP => i j; rewrite !ord1 !mxE. Qed.

(* Orthonormal eigenvectors of a real symmetric K, k of them for any k <= n, with nonincreasing
   eigenvalues; every eigenvector orthogonal to them has an eigenvalue at least as large as
   theirs (the next ones are chosen smallest first and put in front). *)
Lemma sorted_eigvecs n (K : 'M[R]_n) : K^T = K ->
  forall k, (k <= n)%N -> exists E : 'M[R]_(k, n), exists d : 'rV[R]_k,
    [/\ E *m E^T = 1%:M, E *m K = diag_mx d *m E,
        forall i j : 'I_k, (i <= j)%N -> d 0 j <= d 0 i
      & forall (x : 'rV[R]_n) nu, x != 0 -> x *m E^T = 0 -> x *m K = nu *: x ->
          forall j, d 0 j <= nu].
Proof.
move=> hK; elim=> [|k IH] hk.
  exists 0, 0; split.
  - by apply/matrixP => -[].
  - by apply/matrixP => -[].
  - by case.
  - by move=> x nu _ _ _ [].
have [E [d [hE hEK hsort hinv]]] := IH (ltnW hk).
pose W0 := kermx E^T.
have rkE : \rank E^T = k.
  apply/eqP; rewrite eqn_leq rank_leq_col /= mxrank_tr.
  by rewrite -{1}(mxrank1 R k) -hE mxrankM_maxl.
have hW0 : (0 < \rank W0)%N by rewrite mxrank_ker rkE subn_gt0.
pose W := row_base W0.
have hNK : (- K)^T = - K by rewrite trmxN hK.
have hWK : (W *m - K <= W)%MS.
  rewrite mulmxN (eqmx_opp (W *m K)) (eqmxMr K (eq_row_base W0)) eq_row_base.
  exact: kermx_invariant hK hEK.
have [mu [x x0 [hxW hx hmax]]] := max_eigvec_in hNK hW0 (row_base_free W0) hWK.
have hxK : x *m K = (- mu) *: x by rewrite scaleNr -hx mulmxN opprK.
have hxE : x *m E^T = 0.
  by apply/sub_kermxP; move: hxW; rewrite eq_row_base.
have [a a0 hq] := unit_row x0.
pose q := a *: x.
have q0 : q != 0 by rewrite scaler_eq0 negb_or a0.
have hqK : q *m K = (- mu) *: q by rewrite -scalemxAl hxK scalerA mulrC -scalerA.
have hqE : q *m E^T = 0 by rewrite -scalemxAl hxE scaler0.
have hmin (y : 'rV[R]_n) nu : y != 0 -> y *m E^T = 0 -> y *m K = nu *: y -> - mu <= nu.
  move=> y0 hyE hy; rewrite ler_oppl.
  have hyW : (y <= row_base W0)%MS by rewrite eq_row_base; apply/sub_kermxP.
  have hyN : y *m - K = (- nu) *: y by rewrite mulmxN hy scaleNr.
  exact: (hmax y (- nu) y0 hyW hyN).
have e1 : (col_mx q E : 'M_(1 + k, n)) *m (col_mx q E)^T = 1%:M.
  rewrite tr_col_mx mul_col_row hq hqE hE.
  have -> : E *m q^T = 0 by rewrite -[E]trmxK -trmx_mul hqE trmx0.
  by rewrite -scalar_mx_block.
have e2 : (col_mx q E : 'M_(1 + k, n)) *m K =
    diag_mx (row_mx ((- mu)%:M) d) *m col_mx q E.
  rewrite mul_col_mx diag_mx_row mul_block_col diag_mx11 !mul0mx addr0 add0r.
  by rewrite mul_scalar_mx hqK hEK.
exists (col_mx q E), (row_mx ((- mu)%:M) d); split; [exact: e1|exact: e2| |].
- move=> i j hij; rewrite !mxE.
  case: (@splitP 1 k i) => [i0 hi|i1 hi]; case: (@splitP 1 k j) => [j0 hj|j1 hj] /=.
  + by rewrite !ord1 lexx.
  + by rewrite ord1 mxE eqxx mulr1n; exact: (hinv q (- mu) q0 hqE hqK j1).
  + by move: hij; rewrite hi hj ord1.
  + by apply: hsort; move: hij; rewrite hi hj.
- move=> y nu y0 hyE' hy j.
  have e3 : y *m (col_mx q E : 'M_(1 + k, n))^T = row_mx (y *m q^T) (y *m E^T).
    by rewrite tr_col_mx mul_mx_row.
  have /eqP := etrans (esym e3) hyE'; rewrite row_mx_eq0 => /andP [_ /eqP hyE].
  rewrite !mxE.
  case: (@splitP 1 k j) => [j0 _|j1 _] /=.
    by rewrite ord1 mxE eqxx mulr1n; exact: (hmin y nu y0 hyE hy).
  exact: (hinv y nu y0 hyE hy j1).
Qed.

End Basis.

Section SpectralTheorem.
Variable R : rcfType.

(* The spectral theorem for real symmetric matrices over any real closed field:
   K = Q^T diag(d) Q with Q orthogonal. *)
Theorem spectral_theorem n (K : 'M[R]_n) : K^T = K ->
  exists Q : 'M[R]_n, exists d : 'rV[R]_n,
    [/\ Q *m Q^T = 1%:M, Q^T *m Q = 1%:M & K = Q^T *m diag_mx d *m Q].
Proof.
move=> hK; have [Q [d [hQ hQK _ _]]] := sorted_eigvecs hK (leqnn n).
exists Q, d; split => //; first exact: mulmx1C hQ.
by rewrite -mulmxA -hQK mulmxA (mulmx1C hQ) mul1mx.
Qed.

(* TopEig_R(K) exists for every real symmetric K and every R <= n: the first R rows of the
   sorted eigenbasis satisfy the definition [top_eig]. *)
Theorem top_eig_exists n (K : 'M[R]_n) rk : K^T = K -> (rk <= n)%N ->
  exists U : 'M[R]_(n, rk), exists lam : 'rV[R]_rk, top_eig K U lam.
Proof.
move=> hK hrk; have [Q [d [hQ hQK hsort _]]] := sorted_eigvecs hK (leqnn n).
pose w (j : 'I_rk) : 'I_n := widen_ord hrk j.
have weq a b : (w a == w b) = (a == b).
  by apply/eqP/eqP => [h|->] //; apply: val_inj; exact: (congr1 val h).
pose U := \matrix_(i < n, j < rk) Q (w j) i.
pose lam := \row_(j < rk) d 0 (w j).
have hQt : Q^T *m Q = 1%:M := mulmx1C hQ.
exists U, lam; split.
- apply/matrixP => a b; rewrite !mxE -weq.
  have := congr1 (fun M : 'M[R]_n => M (w a) (w b)) hQ; rewrite !mxE => <-.
  by apply: eq_bigr => i _; rewrite !mxE.
- apply/matrixP => i b; rewrite mul_mx_diag !mxE.
  have := congr1 (fun M : 'M[R]_n => M (w b) i) hQK; rewrite mul_diag_mx !mxE.
  move=> e; rewrite mulrC -e; apply: eq_bigr => l _; rewrite !mxE mulrC.
  by congr (_ * _); rewrite -{1}hK mxE.
move=> x j hxU.
pose c := x *m Q^T.
have hx : x = c *m Q by rewrite /c -mulmxA hQt mulmx1.
have hc (i : 'I_n) : (i < rk)%N -> c 0 i = 0.
  move=> hi; transitivity ((x *m U) 0 (Ordinal hi)); last by rewrite hxU mxE.
  rewrite !mxE; apply: eq_bigr => l _; rewrite !mxE.
  by congr (_ * Q _ _); apply: val_inj.
have e1 : x *m K *m x^T = c *m diag_mx d *m c^T.
  by rewrite hx trmx_mul -!mulmxA (mulmxA Q) hQK -!mulmxA (mulmxA Q) hQ mul1mx.
have e2 : x *m x^T = c *m c^T.
  by rewrite hx trmx_mul -!mulmxA (mulmxA Q) hQ mul1mx.
clearbody c; rewrite e1 e2 /mxtrace !big_ord1 mul_mx_diag !mxE mulr_sumr.
apply: ler_sum => i _; rewrite !mxE.
case: (ltnP i rk) => hi; first by rewrite hc // !(mulr0, mul0r).
rewrite mulrAC mulrC ler_wpmul2r //.
  by rewrite -expr2 sqr_ge0.
by apply: hsort; exact: leq_trans (ltnW (ltn_ord j)) hi.
Qed.

End SpectralTheorem.

Section Unconditional.
Variable R : rcfType.
Variables (N d k rk : nat) (u r v : 'I_N -> nat) (p : 'I_N -> R).
Variables (U : forall i, 'M[R]_(d, u i)) (C : forall i, 'M[R]_(u i, k)).
Variables (B : forall i, 'M[R]_(d, r i)) (A : forall i, 'M[R]_(r i, k)).
Variable V : forall i, 'M[R]_(k, v i).

(* P2, the paper's Proposition 1, with nothing assumed: with p >= 0 and
   dim sum_i col(U_i) <= R <= d, a TopEig_R(K) exists, and for it U_ref S = W_bar. *)
Theorem P2_exact :
  (forall j, 0 <= p j) -> (\rank (\sum_i <<(U i)^T>>)%MS <= rk)%N -> (rk <= d)%N ->
  (forall i, U i *m C i = B i *m A i) ->
  exists Uref : 'M[R]_(d, rk), exists lam : 'rV[R]_rk,
    top_eig (consensus p U) Uref lam /\ Uref *m coords p Uref U C = mean_update p B A.
Proof.
move=> hp hrk hd hUC; have [Uref [lam ht]] := top_eig_exists (consensus_sym p U) hd.
by exists Uref, lam; split => //; exact: P2_exact_top_eig hp ht hrk hUC.
Qed.

(* P11 likewise on the right: a TopEig_R(K_R) exists, and for it S' V_ref^T = W_bar. *)
Theorem P11_exact :
  (forall j, 0 <= p j) -> (\rank (\sum_i <<(V i)^T>>)%MS <= rk)%N -> (rk <= k)%N ->
  (forall i, (A i <= (V i)^T)%MS) ->
  exists Vref : 'M[R]_(k, rk), exists lam : 'rV[R]_rk,
    top_eig (consensus p V) Vref lam /\ right_coords p B A Vref *m Vref^T = mean_update p B A.
Proof.
move=> hp hrk hk hA; have [Vref [lam ht]] := top_eig_exists (consensus_sym p V) hk.
by exists Vref, lam; split => //; exact: P11_exact_top_eig hp ht hrk hA.
Qed.

End Unconditional.
